"""diffslim: make diffusers models smaller and faster while keeping their outputs close to the original.

Public API::

    import diffslim
    loaded = diffslim.load("zoo:digits-sd")          # or a pipeline / model / config-only folder
    info = diffslim.profile("zoo:digits-sd")         # params, MACs, per-block table, latency (or profile(pipe));
                                                     # depth=N: of the depth-skipped model
    recipe = diffslim.parse_recipe({"sampling": {"num_inference_steps": 10}})  # RecipeError names a bad field
    diffslim.apply(loaded.pipe, recipe)              # still an ordinary diffusers pipeline
    pipe = diffslim.from_recipe("slim/recipe.json")  # a recipe's model, loaded, with the recipe applied
    diffslim.compile(loaded.pipe)                    # torch.compile, with a skip plan's decisions left eager
    adapted = diffslim.adapt_lora(pruned_unet, lora_state_dict)  # a LoRA of the original, for the pruned model
    stock_ip = diffslim.adapt_ip_adapter(pruned_unet, ip_state_dict)  # an IP-Adapter, for the stock export
"""

from diffslim.apply import apply, from_recipe
from diffslim.compiling import compile_pipeline as compile
from diffslim.combined import DepthSkipLayerPrunedUNet2DConditionModel, DepthSkipLayerPrunedUNet2DModel
from diffslim.errors import UserError
from diffslim.ip_adapter import adapt_ip_adapter
from diffslim.lora import adapt_lora
from diffslim.methods.depth_skip import DepthSkipUNet2DConditionModel, DepthSkipUNet2DModel
from diffslim.methods.depth_skip import profile_depth as profile
from diffslim.methods.timesteps import NonUniformDDIMScheduler  # a saved pipeline's scheduler: diffusers loads it
from diffslim.models.load import LoadedModel, ModelLoadError, load
from diffslim.recipe import Recipe, RecipeError, load_recipe, parse_recipe

__all__ = ["from_recipe", "adapt_ip_adapter", "adapt_lora", "compile", "DepthSkipUNet2DConditionModel", "DepthSkipUNet2DModel", "DepthSkipLayerPrunedUNet2DConditionModel",
           "DepthSkipLayerPrunedUNet2DModel", "NonUniformDDIMScheduler", "apply", "profile", "load", "LoadedModel", "ModelLoadError", "Recipe", "RecipeError", "load_recipe",
           "parse_recipe", "UserError"]
__version__ = "0.1.0"
