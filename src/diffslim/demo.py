"""``make demo``: profile, sample and bench the zoo models (and real models' configs) into one report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

CONFIGS_DIR = Path(__file__).parent / "configs"


def run_demo(out: Path, n: int = 50, methods: str = "full,steps:25,steps:10", console: Console | None = None) -> Path:
    """Write ``out/index.html`` + ``report.json`` + figures; returns the folder."""
    from diffslim.bench import run_bench
    from diffslim.evaluate import eval_set_for, finite, metrics_fn_for
    from diffslim.measure.profile import profile_model
    from diffslim.models.load import ModelLoadError, load
    from diffslim.report import Report, add_bench_section
    from diffslim.zoo.registry import ZOO

    console = console or Console()
    rep = Report("diffslim demo: the reference zoo")
    rep.add_text("what this is",
                 "Every zoo model is trained here on images that installed packages ship (scikit-learn digits, "
                 "scikit-image photos). Each bench compares variants of one model on the same inputs and seeds in "
                 "one process; speedups are ratios of wall times measured in this run on this machine.")
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
                          "latency_ms": None if p["latency_s"] is None else p["latency_s"] * 1e3})
        console.print(f"profiled {name}: {p['params']:,} params, {p['macs'] / 1e9:.3f} GMACs")
    rep.add_table("profiles (one denoiser call, batch 1)", prof_rows)
    rep.add_data("profiles", profiles)
    benches = {}
    for key, entry in ZOO.items():
        model = f"zoo:{key}"
        try:
            loaded = load(model)
        except ModelLoadError as e:
            console.print(f"[yellow]skipping bench of {model}: {e}[/]")
            continue
        es = eval_set_for(loaded, n)
        res = run_bench(loaded, methods, es, default_steps=entry.default_steps, batch_size=n,
                        metrics_fn=metrics_fn_for(loaded, es), progress=True)
        rows = [{k: finite(v) for k, v in r.items()} for r in res.rows]
        benches[model] = rows
        add_bench_section(rep, model, rows, res.outputs)
        console.print(f"benched {model}: " + ", ".join(
            f"{r['method']} speedup {r['speedup']:.2f}" for r in rows))
    rep.add_data("benches", benches)
    return rep.write(out)
