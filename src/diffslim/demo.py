"""``make demo``: profile, sample, search and bench the zoo models (and real models' configs) into one report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

CONFIGS_DIR = Path(__file__).parent / "configs"
# DiP-GO plans trained by bench/dipgo_bench.py (in a source checkout); the demo applies them, it does not train.
PLANS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def _plan_method(key: str) -> str:
    """``,dipgo:@RECIPE`` for the zoo model ``key`` when its trained plan is in the checkout, else ``""``."""
    recipe = PLANS_DIR / f"dipgo_{key}_recipe.json"
    return f",dipgo:@{recipe}" if recipe.exists() else ""


# What the demo runs per zoo model: bench methods, inputs, and whether depth search applies (U-Nets).
# ``layers``: the layer-pruning criteria compared on held-out output loss (greedy re-scoring and the pairs of
# output-loss-pairs where cheap enough), and ``kd_steps`` of normalized and of plain distillation for the
# loss-term balance (0: none). ``workflow``: stages stacked by the guided workflow, with its floor;
# ``workflow_joint``: a joint search of how auto stages share the floor (narrow, to stay quick).
DEMO_PLAN = {
    "digits-sd": dict(n=50, methods="full,steps:25,steps:10,depth:9,depth:7,depth:7+ft,uniform:10,karras:10,ays:10,"
                                    "gamma:10,dpm:10,xue:10,deepcache:3,layers:0.3,bk-sdm:base" + _plan_method("digits-sd"),
                      depth_search=dict(n=20, mode="linear"), layers=dict(greedy=False, pairs=True, kd_steps=0),
                      workflow=dict(n=16, stages="layers:auto,steps:auto,deepcache:auto", floor={"psnr": 30.0}),
                      workflow_joint=dict(n=8, stages="depth:auto,steps:auto", floor={"psnr": 30.0}, search="joint",
                                          joint_width=1)),
    "digits-dit": dict(n=50, methods="full,steps:25,steps:10,uniform:10,karras:10,ays:10,gamma:10,fbcache,layers:0.3"
                                     + _plan_method("digits-dit"), depth_search=None,
                       layers=dict(greedy=True, pairs=True, kd_steps=100, sample=16)),
    "sr": dict(n=8, methods="full,steps:10,depth:9,depth:7,uniform:10,gamma:10,deepcache:3" + _plan_method("sr"),
               depth_search=dict(n=8, mode="binary"), layers=None),
}
LAYER_RATIOS = (0.3, 0.5, 0.7)


def schedules_figure(steps: int, found: dict[str, list[int]]):
    """The timesteps of each N-step schedule, one row per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(found)))
    for i, (name, ts) in enumerate(found.items()):
        ax.plot(ts, [i] * len(ts), "o", ms=5)
    ax.set_yticks(range(len(found)), list(found))
    ax.set_xlabel("timestep (999 = pure noise)")
    ax.set_xlim(1010, -10)
    ax.set_title(f"{steps}-step schedules")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def finetune_recovery_figure(model: str, rows: list[dict]):
    """PSNR and SSIM against the full model of each depth before (``depth:N``) and after (``depth:N+ft``)
    fine-tuning; None when the bench has no such pair."""
    by = {r["method"]: r for r in rows}
    depths = sorted(int(m.split(":")[1]) for m in by if m.startswith("depth:") and not m.endswith("+ft")
                    and f"{m}+ft" in by)
    if not depths:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, key in zip(axes, ("psnr", "ssim")):
        x = range(len(depths))
        ax.bar([i - 0.2 for i in x], [by[f"depth:{d}"][key] for d in depths], 0.4, label="pruned")
        ax.bar([i + 0.2 for i in x], [by[f"depth:{d}+ft"][key] for d in depths], 0.4, label="pruned + fine-tuned")
        ax.set_xticks(list(x), [f"depth {d}" for d in depths])
        ax.set_ylabel(f"{key} vs full model")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: fine-tune recovery")
    fig.tight_layout()
    return fig


def layer_pruning_section(rep, loaded, model: str, key: str, greedy: bool, pairs: bool, kd_steps: int,
                          work: Path, sample: int = 0) -> dict:
    """The criteria of layer pruning on ``loaded``'s denoiser (held-out output loss at each ratio, BK-SDM, the
    additivity of single losses), with ``sample`` the PSNR of each selection's samples (that many inputs) against
    the full model's, and, with ``kd_steps``, the loss-term shares of a normalized and a plain distillation of the
    output-loss selection at 0.5; figures and tables go to ``rep``. Returns the data."""
    from diffslim.methods import layer_prune as lp
    from diffslim.methods.layer_compare import compare_criteria, curves_of
    from diffslim.report import additivity_figure, loss_balance_figure, output_loss_figure
    from diffslim.train.distill import DistillConfig

    d = loaded.denoiser
    calib, held = lp.calibration(loaded.pipe, n=32, seed=0), lp.calibration(loaded.pipe, n=32, seed=1)
    res = compare_criteria(d, calib, held, LAYER_RATIOS, greedy=greedy, pairs=pairs)
    curves = curves_of(res)
    rep.add_table(f"layer pruning: {model} (held-out output loss, lower is better)",
                  [{"ratio": row["ratio"], **{k: row[k] for k in curves}} for row in res["ratios"]])
    rep.add_figure(f"layer pruning criteria: {model}", f"output_loss_{key}.png",
                   output_loss_figure(curves, model, {b["variant"]: (b["ratio"], b["bk_sdm_loss"])
                                                      for b in res["bk_sdm"]}),
                   "MSE of the noise prediction against the full model's on 32 held-out calibration triples, for the "
                   "layers each criterion removes at each share of params (random: mean of 3 seeds; greedy: "
                   "iterative re-scoring, not one-shot; crosses: BK-SDM's handcrafted removals)")
    if sample:
        from diffslim.bench import sample_layer_selections
        from diffslim.evaluate import eval_set_for, metrics_fn_for
        from diffslim.sample import SampleSpec

        es = eval_set_for(loaded, sample)
        spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=loaded.zoo.default_steps,
                          call_kwargs=dict(es.call_kwargs), batch_size=sample)
        psnr, bk = sample_layer_selections(loaded.pipe, res, spec, metrics_fn_for(loaded, es))
        rep.add_table(f"layer pruning: {model} (PSNR of samples against the full model's, higher is better)",
                      [{"ratio": row["ratio"], **{k: row[f"{k}_sampled"]["psnr"] for k in curves}}
                       for row in res["ratios"]])
        rep.add_figure(f"what the output loss stands for: {model}", f"sampled_psnr_{key}.png",
                       output_loss_figure(psnr, model, bk, ylabel="PSNR of samples vs the full model's (dB)", log=False),
                       f"each criterion's selection sampled on {sample} evaluation inputs ({spec.num_inference_steps} "
                       "steps, no retraining), its outputs against the full model's: the output loss is a proxy, and "
                       "does not always rank selections as their samples do (`diffslim layer-compare MODEL --sample N`)")
    add = res["additivity"]
    rep.add_figure(f"additivity of the output loss: {model}", f"additivity_{key}.png",
                   additivity_figure(add["summed"], add["measured"], add["pearson"], model, add.get("second_order"),
                                     add.get("pearson_second_order")),
                   f"{len(add['sets'])} random layer sets: measured output loss against the sum of the single "
                   "layers' (and the second-order prediction, which adds each pair's interaction)")
    if kd_steps:
        names = res["ratios"][LAYER_RATIOS.index(0.5)]["output-loss_removed"]
        logs, weights = {}, {}
        for mode in ("normalized", "plain"):
            cfg = DistillConfig(steps=kd_steps, batch_size=32, lr=2e-4, out=work / f"layer_kd_{key}_{mode}",
                                checkpoint_every=kd_steps, log_every=5, normalized=mode == "normalized",
                                match_plain_weight=mode == "normalized", progress=False)
            r = lp.distill_pruned(loaded.pipe, lp.prune_layers(d, names), cfg)
            logs[mode] = Path(cfg.out) / "train_log.csv"
            weights[mode] = {"feat": r.feat_scale}  # the log holds the unweighted feature term
        rep.add_figure(f"loss-term balance during distillation: {model}", f"loss_balance_{key}.png",
                       loss_balance_figure(logs, weights, title=f"{model}: ratio 0.5, {kd_steps} steps"),
                       "each term's share of the loss (task, output, feature) while distilling the output-loss "
                       "selection at 0.5, normalized (feature weight matched to the plain sum) and plain")
    return res


def workflow_section(rep, loaded, model: str, steps: int, n: int, stages: str, floor: dict, search: str = "greedy",
                     joint_width: int = 3) -> dict:
    """The guided workflow's stages on ``model`` (in a temporary folder) as a report section; its JSON.
    ``search="joint"``: the joint search (``joint_width`` milder settings per auto stage), in a section of its own."""
    import tempfile

    from diffslim.bench import timing_note
    from diffslim.evaluate import eval_set_for, finite, metrics_fn_for, reference_images
    from diffslim.report import add_workflow_section
    from diffslim.workflow import run_workflow

    es = eval_set_for(loaded, n)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_workflow(loaded, stages, es, Path(tmp), default_steps=steps, batch_size=n,
                           metrics_fn=metrics_fn_for(loaded, es), floor=floor, progress=False, log=lambda m: None,
                           **(dict(search=search, joint_width=joint_width) if search == "joint" else {}))
    joint = search == "joint"
    title = f"{model} (joint search)" if joint else model
    rep.add_text(f"workflow: {title}",
                 f"`diffslim workflow {model} --stages {stages} --floor "
                 + ",".join(f"{k}={v:g}" for k, v in floor.items()) + f" --n {n}"
                 + (f" --search joint --joint-width {joint_width}" if joint else "") + "`: each stage stacks on the "
                 "one before and is judged against the original's outputs; a stage below the floor is rejected, and an "
                 "auto stage keeps the most aggressive setting it finds above the floor (grey: the settings it "
                 "tried)" + ("; the joint search also ran the stack with the first auto stage milder and without it, "
                             "and kept the cheapest result in MACs (orange: the others)." if joint else "."))
    add_workflow_section(rep, title, res, floor, references=reference_images(es),
                         timing=timing_note(res.timing, "the stages"))
    return {**res.to_json(), "rows": [{k: finite(v) for k, v in r.items()} for r in res.rows]}


# A LoRA of zoo:digits-sd that mirrors its digits, trained on the full model by bench/lora_transfer.py (in a source
# checkout); the demo adapts it to pruned models, it does not train it.
LORA_FILE = PLANS_DIR / "lora_transfer_digits-sd.lora.safetensors"
LORA_PLAN = dict(model="zoo:digits-sd", methods="full,layers:0.3,depth:9,depth:7", n=20)


def lora_section(rep, lora_file: Path, model: str, methods: str, n: int) -> dict:
    """A LoRA of the full model, adapted to each method's pruned model (``diffslim lora``), as a report section:
    the share of samples read as the requested digit once mirrored back (the LoRA draws mirrored digits), PSNR
    against the full model with the LoRA, the LoRA modules kept and dropped, and a grid. Returns its rows."""
    import torch

    from diffslim.bench import sample_with_adapters
    from diffslim.lora import read_lora
    from diffslim.measure import quality
    from diffslim.report import image_grid
    from diffslim.sample import SampleSpec
    from diffslim.zoo.classifier import load_digit_classifier
    from diffslim.zoo.evalsets import zoo_eval_set

    tensors, _ = read_lora(lora_file)
    lora = {k.split(".", 1)[1]: v.float() for k, v in tensors.items()}  # the pipeline's "denoiser." prefix
    es = zoo_eval_set(model.split(":", 1)[1], n, seed=0)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, call_kwargs=es.call_kwargs, batch_size=n)
    samples = sample_with_adapters(model, methods, spec, lora=lora)
    classifier = load_digit_classifier()
    ref = samples["full"]["outputs"]
    rows = []
    for method, r in samples.items():
        rows.append({"method": method, "params": r["params"], "lora_modules_kept": r["lora_modules_kept"],
                     "lora_modules_dropped": r["lora_modules_dropped"],
                     "mirrored_digit_accuracy": quality.digit_accuracy(r["outputs"].flip(-1), es.labels, classifier),
                     "psnr_vs_full_with_lora": None if method == "full" else
                     float(quality.psnr(r["outputs"], ref).mean())})
    rep.add_text(f"LoRAs on pruned models: {model}",
                 f"A LoRA trained on the full {model} only, to draw every digit mirrored (bench/lora_transfer.py), "
                 "adapted to each pruned model by `diffslim lora` (the LoRA of the removed layers dropped) and "
                 f"sampled on {n} inputs, 50 DDIM steps. Mirrored digit accuracy: the share of samples the digit "
                 "classifier reads as the requested digit once mirrored back (the LoRA's effect carries over where "
                 "it stays near the full model's); PSNR against the full model with the LoRA.")
    rep.add_table(f"LoRA on pruned models: {model}", rows)
    grid = torch.cat([samples[m]["outputs"][:10] for m in samples])
    rep.add_figure(f"LoRA samples: {model}", "lora_digits-sd.png", image_grid(grid, nrow=10, upscale=4),
                   "one row per model (" + ", ".join(samples) + "), each with the adapted LoRA; first 10 inputs")
    return {"lora": str(lora_file), "n": n, "rows": rows}


# An IP-Adapter of zoo:digits-sd (image prompt: a digit's pixels), trained on the full model by
# bench/ip_adapter_transfer.py; the demo loads the original file into pruned models, it does not train it.
IP_ADAPTER_FILE = PLANS_DIR / "ip_adapter_transfer_digits-sd.ip_adapter.safetensors"
IP_ADAPTER_PLAN = dict(model="zoo:digits-sd", methods="full,layers:0.3,depth:9,depth:7", n=20)


def ip_adapter_section(rep, ip_file: Path, model: str, methods: str, n: int) -> dict:
    """An IP-Adapter of the full model, loaded as it is into each method's pruned model (the pruned classes renumber
    it), as a report section: the share of samples read as the prompt digit's class (null label, a held-out digit as
    the image prompt), PSNR against the full model with the IP-Adapter, the IP layers kept, and a grid."""
    import torch

    from diffslim.bench import sample_with_adapters
    from diffslim.ip_adapter import read_ip_adapter
    from diffslim.measure import quality
    from diffslim.models.adapters import ip_adapter_parts
    from diffslim.report import image_grid
    from diffslim.sample import SampleSpec
    from diffslim.zoo.classifier import load_digit_classifier
    from diffslim.zoo.evalsets import image_prompt_eval_set
    from diffslim.zoo.registry import zoo_entry

    image_proj, ip, _ = ip_adapter_parts(read_ip_adapter(ip_file))
    es = image_prompt_eval_set(n, null_label=zoo_entry(model.split(":", 1)[1]).cond_config["num_labels"])
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=50, batch_size=n)
    samples = sample_with_adapters(model, methods, spec, ip_adapter={"image_proj": image_proj, "ip_adapter": ip})
    classifier = load_digit_classifier()
    ref = samples["full"]["outputs"]
    rows = [{"method": m, "params": r["params"], "ip_layers": r["ip_processors"],
             "prompt_digit_accuracy": quality.digit_accuracy(r["outputs"], es.labels, classifier),
             "psnr_vs_full_with_ip_adapter": None if m == "full" else float(quality.psnr(r["outputs"], ref).mean())}
            for m, r in samples.items()]
    rep.add_text(f"IP-Adapters on pruned models: {model}",
                 f"An IP-Adapter trained on the full {model} only, to draw the digit of an image prompt (a digit's "
                 "pixels; bench/ip_adapter_transfer.py), loaded as it is into each pruned model (diffslim's pruned "
                 "classes renumber its weights to the kept attention layers) and sampled with the null label and a "
                 f"held-out digit as the prompt, {n} inputs, 50 DDIM steps. Prompt digit accuracy: the share of "
                 "samples the digit classifier reads as the prompt's class; PSNR against the full model with it.")
    rep.add_table(f"IP-Adapter on pruned models: {model}", rows)
    grid = torch.cat([es.real_images[:10]] + [samples[m]["outputs"][:10] for m in samples])
    rep.add_figure(f"IP-Adapter samples: {model}", "ip_adapter_digits-sd.png", image_grid(grid, nrow=10, upscale=4),
                   "first row: the image prompts; then one row per model (" + ", ".join(samples) + ")")
    return {"ip_adapter": str(ip_file), "n": n, "rows": rows}


def run_demo(out: Path, n: int | None = None, methods: str | None = None, console: Console | None = None) -> Path:
    """Write ``out/index.html`` + ``report.json`` + figures; returns the folder.

    ``n`` and ``methods`` override the per-model plan (``DEMO_PLAN``).
    """
    from diffslim.apply import denoiser_attr
    from diffslim.bench import run_bench, timing_note
    from diffslim.evaluate import eval_set_for, finite, metrics_fn_for, reference_images
    from diffslim.measure.profile import profile_model
    from diffslim.methods.depth_skip import profile_depths
    from diffslim.methods.depth_search import depth_search_figure, search_depth
    from diffslim.models.load import ModelLoadError, load
    from diffslim.recipe import load_recipe
    from diffslim.report import Report, add_bench_section, pareto_figure, plan_heatmap
    from diffslim.sample import SampleSpec, sample
    from diffslim.zoo.registry import ZOO

    if methods is not None:
        from diffslim.bench import parse_methods

        parse_methods(methods)  # a bad method name is refused before the first model is profiled
    console = console or Console()
    rep = Report("diffslim demo: the reference zoo")
    rep.add_text("what this is",
                 "Every zoo model is trained here on images that installed packages ship (scikit-learn digits, "
                 "scikit-image photos). Each bench compares variants of one model on the same inputs and seeds in "
                 "one process; speedups are ratios of wall times measured in this run on this machine, and "
                 "psnr/ssim compare each variant's outputs with the full model's.")
    prof_rows, profiles = [], {}
    targets = [f"zoo:{k}" for k in ZOO] + [str(p) for p in sorted(CONFIGS_DIR.iterdir()) if (p / "config.json").exists()]
    for target in targets:
        try:
            p = profile_model(target, repeats=3)
        except ModelLoadError as e:
            console.print(f"[yellow]skipping {target}: {e}[/]")
            continue
        name = target if target.startswith("zoo:") else Path(target).name
        profiles[name] = p
        prof_rows.append({"model": name, "class": p["class"], "input": "x".join(map(str, p["sample_size"])),
                          "params": p["params"], "GMACs": p["macs"] / 1e9,
                          "GMACs_excl_attention": p["macs_excl_attention"] / 1e9,
                          "latency_ms": None if p["latency_s"] is None else p["latency_s"] * 1e3})
        console.print(f"profiled {name}: {p['params']:,} params, {p['macs'] / 1e9:.3f} GMACs")
    rep.add_table("profiles (one denoiser call, batch 1)", prof_rows)
    rep.add_data("profiles", profiles)

    sd15 = CONFIGS_DIR / "sd15-unet"
    if (sd15 / "config.json").exists():
        rows = profile_depths(str(sd15))
        rep.add_table("depth-skip on SD-1.5's U-Net (config only, 64x64 latent)", rows,
                      ["depth", "params", "params_ratio", "macs", "macs_ratio", "macs_excl_attention"])
        rep.add_data("sd15_depths", rows)
        console.print("profiled SD-1.5 at every depth")

    benches, searches, layer_results, workflows = {}, {}, {}, {}
    for key, plan in DEMO_PLAN.items():
        model = f"zoo:{key}"
        try:
            loaded = load(model)
        except ModelLoadError as e:
            console.print(f"[yellow]skipping {model}: {e}[/]")
            continue
        k = n or plan["n"]
        es = eval_set_for(loaded, k)
        res = run_bench(loaded, methods or plan["methods"], es, default_steps=ZOO[key].default_steps, batch_size=k,
                        metrics_fn=metrics_fn_for(loaded, es), progress=True)
        rows = [{kk: finite(v) for kk, v in r.items()} for r in res.rows]
        benches[model] = rows
        add_bench_section(rep, model, rows, res.outputs, references=reference_images(es),
                          timing=timing_note(res.timing))
        console.print(f"benched {model}: " + ", ".join(f"{r['method']} x{r['speedup']:.2f}" for r in rows))
        if res.timing:
            console.print(f"  {timing_note(res.timing)}", highlight=False)
        rep.add_figure(f"quality against MACs: {model}", f"pareto_{key}.png",
                       pareto_figure(rows, "psnr", f"{model}: PSNR vs the full model against run MACs"),
                       "every bench row above; up and to the left is better")
        plan_row = next((r for r in rows if str(r["method"]).startswith("dipgo:")), None)
        if plan_row is not None:
            rec = load_recipe(PLANS_DIR / f"dipgo_{key}_recipe.json").skip_plan
            rep.add_figure(f"DiP-GO skip plan: {model}", f"plan_{key}.png",
                           plan_heatmap(rec.plan, rec.units, f"{model}: learned skip plan ({rec.granularity} units)"),
                           "dark = the unit runs at that step; a skipped unit hands on its output from the last step "
                           f"it ran (plan from bench/dipgo_bench.py; {plan_row['macs_ratio']:.3f} of the run MACs)")
        fig = finetune_recovery_figure(model, rows)
        if fig is not None:
            rep.add_figure(f"fine-tune recovery: {model}", f"finetune_{key}.png", fig,
                           "depth-skipped model before and after the default short fine-tune (diffusion loss + "
                           "distillation from the full model), quality against the full model on the bench inputs")
        found = {r["method"]: [int(t) for t in r["notes"].split("timesteps [")[-1].rstrip("]").split(",")]
                 for r in rows if "timesteps [" in (r.get("notes") or "")}
        if found:
            steps = len(next(iter(found.values())))
            rep.add_figure(f"schedules: {model}", f"schedules_{key}.png", schedules_figure(steps, found),
                           "timesteps of the explicit-schedule rows above")
        ds = plan["depth_search"]
        if ds:
            calib = eval_set_for(loaded, ds["n"], seed=10_000)
            spec = SampleSpec(calib.inputs, calib.seeds, num_inference_steps=ZOO[key].default_steps, batch_size=ds["n"])
            ref = sample(loaded.pipe, spec)
            sres = search_depth(loaded.pipe, denoiser_attr(loaded.pipe), spec, ref, threshold=30.0, mode=ds["mode"])
            searches[model] = sres.to_json()
            shape = "" if sres.monotone is None else f" ({'monotone' if sres.monotone else 'not monotone'} in depth)"
            rep.add_figure(f"depth search: {model}", f"depth_search_{key}.png",
                           depth_search_figure(sres, f"{model}: PSNR vs depth ({ds['n']} calibration inputs)"),
                           f"{ds['mode']} search, {sres.sampling_runs} sampling runs; shallowest depth with PSNR >= 30 dB: "
                           f"{sres.depth}{shape}")
            console.print(f"depth search {model}: depth {sres.depth} ({sres.sampling_runs} runs)")
        if plan.get("layers"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                layer_results[model] = layer_pruning_section(rep, loaded, model, key, work=Path(tmp), **plan["layers"])
            console.print(f"layer pruning criteria {model}: additivity r = "
                          f"{layer_results[model]['additivity']['pearson']:.3f}")
        for which in ("workflow", "workflow_joint"):
            if plan.get(which):
                title = model + (" (joint search)" if which == "workflow_joint" else "")
                workflows[title] = workflow_section(rep, loaded, model, ZOO[key].default_steps, **plan[which])
                console.print(f"workflow {title}: " + ", ".join(f"{r['stage']} {r['macs_ratio']:.3f} MACs"
                                                               for r in workflows[title]["rows"]))
    if LORA_FILE.exists():
        rep.add_data("lora", lora_section(rep, LORA_FILE, **LORA_PLAN))
        console.print("LoRA on pruned models: " + ", ".join(
            f"{r['method']} {r['mirrored_digit_accuracy']:.2f}" for r in rep.data["lora"]["rows"]))
    if IP_ADAPTER_FILE.exists():
        rep.add_data("ip_adapter", ip_adapter_section(rep, IP_ADAPTER_FILE, **IP_ADAPTER_PLAN))
        console.print("IP-Adapter on pruned models: " + ", ".join(
            f"{r['method']} {r['prompt_digit_accuracy']:.2f}" for r in rep.data["ip_adapter"]["rows"]))
    rep.add_data("benches", benches)
    rep.add_data("workflows", workflows)
    rep.add_data("depth_searches", searches)
    rep.add_data("layer_pruning", layer_results)
    return rep.write(out)
