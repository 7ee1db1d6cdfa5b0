"""Reports: one folder with ``index.html``, ``report.json`` and PNG figures.

Sections are added in order (text, tables, figures); ``write`` renders them. Later methods add their
own sections (plots of searches, skip plans, loss balances) through the same calls.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int = 8, upscale: int = 1, pad: int = 1):
    """A PIL image tiling ``images`` ``(N, C, H, W)`` in [0, 1], ``nrow`` per row, nearest-upscaled."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    if c == 1:
        images = images.repeat(1, 3, 1, 1)
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.ones(3, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def labelled_grid(outputs: dict, k: int = 8, height: int = 64):
    """A PIL image with one row per entry of ``outputs`` (``{label: (N, C, H, W) in [0, 1]}``, the same inputs in
    the same order in each), its first ``k`` images nearest-upscaled to about ``height`` px, and the label at the
    row's left: the methods side by side, input by input."""
    from PIL import Image, ImageDraw

    rows = [(str(label), imgs[:k]) for label, imgs in outputs.items() if len(imgs)]
    if not rows:
        raise ValueError("labelled_grid: no images")
    tiles = [image_grid(imgs, nrow=k, upscale=max(1, height // imgs.shape[-2])) for _, imgs in rows]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(draw.textlength(label)) for label, _ in rows) + 12
    width = label_w + max(t.width for t in tiles)
    out = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    pen, y = ImageDraw.Draw(out), 0
    for (label, _), tile in zip(rows, tiles):
        out.paste(tile, (label_w, y))
        pen.text((4, y + tile.height // 2 - 5), label, fill="black")
        y += tile.height
    return out


def slug(model: str) -> str:
    """A file-name part for a model argument: ``zoo:digits-sd`` -> ``zoo_digits-sd``, a path -> its parts joined."""
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(model)).strip("_")


def _fmt(v) -> str:
    if isinstance(v, bool):  # as the terminal's tables say it
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1e5:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 100_000:
        return f"{v:,}"
    return "" if v is None else str(v)


REFERENCE_ROWS = ("full", "original")  # the rows the others are compared with
AGAINST_REFERENCE = ("psnr", "ssim", "lpips")  # their own value is no measurement: the terminal and HTML say "ref"


def is_reference_cell(row: dict, column: str, key: str) -> bool:
    """Whether ``row[column]`` compares the reference row (``row[key]`` full or original) with itself."""
    return row.get(key) in REFERENCE_ROWS and column in AGAINST_REFERENCE and column in row


def json_rows(rows: list, key: str) -> list:
    """``rows`` as JSON gives them: a reference cell is no measurement (its PSNR is a cap, 100), so it is null, as
    the terminal and HTML say "ref"."""
    return [{c: None if key and is_reference_cell(r, c, key) else v for c, v in r.items()} for r in rows]


class Report:
    """An HTML + JSON report built section by section."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, str, object]] = []
        self.data: dict = {}
        self._figures: list[tuple[str, object]] = []

    def add_text(self, heading: str, text: str) -> None:
        self.sections.append(("text", heading, text))

    def add_table(self, heading: str, rows: Sequence[dict], columns: Optional[Sequence[str]] = None,
                  key: Optional[str] = None, headers: Optional[dict] = None) -> None:
        """A table of ``rows`` (``columns``: default every key); ``key``: the column that names a row, whose
        reference row (full, original) reads "ref" where it is compared with itself (PSNR, SSIM, LPIPS);
        ``headers``: what a column's header says where it is not its key (e.g. with its unit)."""
        cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
        self.sections.append(("table", heading, (cols, list(rows), key, dict(headers or {}))))

    def add_figure(self, heading: str, name: str, figure, caption: str = "") -> None:
        """``figure``: a matplotlib Figure or a PIL image; saved as ``name`` (PNG) beside index.html.

        A matplotlib figure is rendered now and closed, so that a long report does not keep dozens open."""
        if hasattr(figure, "savefig"):
            import io

            import matplotlib.pyplot as plt

            buf = io.BytesIO()
            figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            plt.close(figure)
            figure = buf.getvalue()
        self._figures.append((name, figure))
        self.sections.append(("figure", heading, (name, caption)))

    def add_data(self, key: str, value) -> None:
        """Machine-readable content for report.json."""
        self.data[key] = value

    def write(self, out_dir) -> Path:
        """Write index.html, report.json and the figures to ``out_dir``. Figures an earlier report in that folder
        showed and this one does not are removed (a rerun with fewer methods leaves none of the old ones)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        mine = {name for name, _ in self._figures}
        for name in _shown_figures(out / "index.html") - mine:
            (out / name).unlink(missing_ok=True)
        for name, fig in self._figures:
            if isinstance(fig, bytes):
                (out / name).write_bytes(fig)
            else:
                fig.save(out / name)
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
                 "img{image-rendering:pixelated;max-width:100%}figcaption{color:#555;font-size:90%}</style>",
                 f"</head><body><h1>{html.escape(self.title)}</h1>"]
        for kind, heading, body in self.sections:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            if kind == "text":
                parts.append("<p>" + "<br>".join(html.escape(line) for line in body.split("\n")) + "</p>")
            elif kind == "table":
                cols, rows, key, headers = body
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in cols)
                             + "</tr>")
                for r in rows:
                    cells = ("ref" if key and is_reference_cell(r, c, key) else _fmt(r.get(c)) for c in cols)
                    parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
                parts.append("</table>")
            else:
                name, caption = body
                parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(heading)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</body></html>")
        (out / "index.html").write_text("\n".join(parts))
        tables = {h: json_rows(rows, key) for kind, h, body in self.sections if kind == "table"
                  for _, rows, key, _ in [body]}
        (out / "report.json").write_text(json.dumps({"title": self.title, "tables": tables, **self.data},
                                                    indent=2, default=_json_default))
        return out


def _shown_figures(index: Path) -> set[str]:
    """The figure files an index.html that :meth:`Report.write` wrote shows (names beside it, no paths)."""
    import re

    try:
        text = index.read_text(errors="replace")
    except OSError:
        return set()
    names = {html.unescape(m) for m in re.findall(r"<figure><img src='([^']+)'", text)}
    return {n for n in names if "/" not in n and "\\" not in n and n not in (".", "..") and n.endswith(".png")}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def bench_figure(rows: Sequence[dict], title: str = ""):
    """Quality against cost, both panels over the MACs reduction (full / the method's sampling run, so more
    compression lies to the right in both): PSNR (left) and measured speedup (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 3.8))
    colors, markers = plt.get_cmap("tab20").colors, "osD^vPX*<>"
    for i, r in enumerate(rows):  # one colour and marker per method, the same in both panels, named in the legend
        style = dict(color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], marker=markers[i % len(markers)], s=36)
        psnr = r.get("psnr")
        if psnr is not None and r["method"] != "full":
            a.scatter(1 / r["macs_ratio"], psnr, **style)
        b.scatter(1 / r["macs_ratio"], r["speedup"], label=r["method"], **style)
    a.set_xlabel("MACs reduction (x): full / sampling run")
    a.set_ylabel("PSNR vs full (dB)")
    a.grid(alpha=0.3)
    lim = max([1.0] + [1 / r["macs_ratio"] for r in rows] + [r["speedup"] for r in rows]) * 1.1
    b.plot([0, lim], [0, lim], "k--", lw=0.8, label="speedup = MACs reduction")
    b.set_xlabel("MACs reduction (x): full / sampling run")
    b.set_ylabel("measured speedup (x)")
    b.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
             ncol=1 if len(rows) <= 14 else 2)
    b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def skip_lines(rows: Sequence[dict], key: str) -> list[str]:
    """One line per reason a metric was skipped (``row["skipped"]``), naming the rows (by ``row[key]``) unless every
    row shares it."""
    skips: dict = {}
    for r in rows:
        for k, why in (r.get("skipped") or {}).items():
            skips.setdefault(f"{k} skipped: {why}", []).append(str(r[key]))
    return [text if len(where) == len(rows) > 1 else f"{', '.join(where)}: {text}" for text, where in skips.items()]


def add_bench_section(rep, model: str, rows, outputs, references: Optional[dict] = None,
                      timing: Optional[str] = None) -> None:
    """Bench rows, the cost/quality figure and one image grid per method; ``references``: rows shown above the
    methods in the side-by-side grid (``{"input": (N, C, h, w), "ground truth": ...}``, see
    :func:`diffslim.evaluate.reference_images`); ``timing``: the run's timing-noise line
    (:func:`diffslim.bench.timing_note`), shown under the table."""
    tag = slug(model)
    # the terminal table's columns (every metric a row has, clip_score, lpips and fid included), and the seconds
    hidden = ("skipped", "notes", "macs_per_sample", "search", "candidates")
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in hidden]
    n = len(next(iter(outputs.values()))) if outputs else None
    rep.add_table(f"bench: {model}", rows, cols, key="method",
                  headers={"seconds": f"seconds (sampling all {n} inputs)" if n else "seconds (sampling run)"})
    notes = [f"{r['method']}: {r['notes']}" for r in rows if r.get("notes")] + skip_lines(rows, "method")
    notes += [timing] if timing else []
    if notes:
        rep.add_text(f"notes: {model}", "\n".join(notes))
    rep.add_figure(f"cost and quality: {model}", f"bench_{tag}.png", bench_figure(rows, model),
                   "both panels over the MACs reduction (the full model's MACs over the method's, for the whole "
                   "sampling run; more compression to the right): left, PSNR against the full model's outputs; right, "
                   "the measured speedup (the dashed line is speedup = MACs reduction)")
    if len(outputs) > 1:
        k = min(8, min(len(v) for v in outputs.values()))
        rep.add_figure(f"samples side by side: {model}", f"grid_{tag}_all.png",
                       labelled_grid({**(references or {}), **outputs}, k),
                       f"one row per method, the first {k} inputs in the same order (same seeds and inputs)"
                       + _reference_caption(references))
    for method, imgs in outputs.items():
        k = min(16, len(imgs))
        up = max(1, 64 // imgs.shape[-1])
        rep.add_figure(f"samples: {model} / {method}", f"grid_{tag}_{method.replace(':', '-')}.png",
                       image_grid(imgs[:k], nrow=8, upscale=up), f"first {k} outputs, same seeds and inputs as full")


# ---------------------------------------------------------------------------------------------
# Layer pruning (LAPTOP-Diff): output loss vs ratio, additivity, loss-term balance


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_loss_figure(curves: dict, title: str = "", bk_points: Optional[dict] = None,
                       ylabel: str = "output loss (MSE vs full, held out)", log: bool = True,
                       xlabel: str = "pruning ratio (share of params removed)", matched: Optional[dict] = None):
    """Output loss (held-out MSE vs the full model) against the pruning ratio, one line per criterion.

    ``curves``: ``{criterion: [(ratio, loss), ...]}``; ``bk_points``: ``{label: (ratio, loss)}`` (BK-SDM).
    Another measure of each selection (e.g. the PSNR of its samples) plots the same way with ``ylabel`` and
    ``log=False``; a comparison by MACs with ``xlabel``, and ``matched``: ``{label: (ratio, value)}`` of the
    output-loss selections at each BK-SDM variant's MACs and params (stars).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    # criteria often pick the same layers: each line gets its own marker and dash, drawn widest first, so that a
    # line under another still shows
    markers, dashes = "osD^vP*X<>", ["-", "--", "-.", ":"]
    order = sorted(curves, key=lambda c: c != "output-loss")
    for i, crit in enumerate(order):
        pts = sorted(curves[crit])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], ls=dashes[i % 4],
                label=crit, lw=2.6 if crit == "output-loss" else 1.3, ms=9 - 5 * i / max(1, len(order) - 1),
                zorder=2 + i)
    ratios = sorted({p[0] for pts in curves.values() for p in pts})
    if 0 < len(ratios) <= 8:
        ax.set_xticks(ratios)
    for i, (label, (r, loss)) in enumerate((bk_points or {}).items()):
        ax.scatter([r], [loss], marker="x", s=50, color="k")  # labels staggered: the variants often sit close
        ax.annotate(label, (r, loss), fontsize=8, xytext=(4, 3 + 9 * i), textcoords="offset points")
    if matched:
        pts = list(matched.values())
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=90, color="k",
                   label="output loss at BK-SDM's MACs and params")
    if log:
        ax.set_yscale("log")
        from matplotlib.ticker import LogFormatter

        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the axes
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def additivity_figure(summed: Sequence[float], measured: Sequence[float], r: float, title: str = "",
                      second: Optional[Sequence[float]] = None, r_second: Optional[float] = None):
    """Measured L(S) against sum_{i in S} L_i for random layer sets S, with their Pearson correlation;
    ``second``: the second-order predictions of the same sets (sum L_i plus the pairs' interactions)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.scatter(summed, measured, s=14, label="sum of single losses")
    vals = list(summed) + list(measured) + list(second or [])
    if second is not None:
        ax.scatter(second, measured, s=14, marker="^", label="second order (+ pairs)")
    hi = max(vals + [1e-12]) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="prediction = L(S)")
    ax.set_xlabel("predicted output loss of the set")
    ax.set_ylabel("measured output loss of the set")
    rs = f"Pearson r = {r:.3f}" + ("" if r_second is None else f", second order {r_second:.3f}")
    ax.set_title((title + ": " if title else "") + rs, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_balance_figure(logs: dict, weights: Optional[dict] = None, title: str = ""):
    """Each loss term's share of the total during distillation, one panel per run.

    ``logs``: ``{label: path to a trainer train_log.csv}`` (columns step, task, out, feat);
    ``weights``: ``{label: {"task": l_task, "out": l_out, "feat": l_feat}}`` (default 1 each).
    """
    import csv

    plt = _plt()
    fig, axes = plt.subplots(1, len(logs), figsize=(4.4 * len(logs), 3.6), squeeze=False)
    for ax, (label, path) in zip(axes[0], logs.items()):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        w = (weights or {}).get(label, {})
        steps = [int(r["step"]) for r in rows]
        terms = {k: np.array([float(r[k]) * w.get(k, 1.0) for r in rows]) for k in ("task", "out", "feat")}
        total = sum(terms.values())
        total = np.where(total > 0, total, 1.0)
        ax.stackplot(steps, *[terms[k] / total for k in terms], labels=list(terms))
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of the loss")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# Skip plans (issue 5): plan heatmap and quality-vs-MACs Pareto plot


def plan_heatmap(plan, unit_names: Sequence[str], title: str = "", effective=None):
    """A skip plan as a heatmap, units (rows, forward order) x steps (columns): dark = runs.

    ``plan``: ``(steps, units)`` bools; ``effective`` (same shape, optional): what actually runs after
    dependencies, drawn in a lighter shade where the plan keeps a unit that still does not run.
    """
    plt = _plt()
    p = np.asarray(plan, dtype=float).T
    if effective is not None:
        e = np.asarray(effective, dtype=float).T
        p = np.where((p > 0) & (e == 0), 0.5, p)
    fig, ax = plt.subplots(figsize=(max(6, 0.14 * p.shape[1] + 3), max(3, 0.22 * p.shape[0] + 1)))
    ax.imshow(p, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(unit_names)))
    ax.set_yticklabels(unit_names, fontsize=6)
    ax.set_xlabel("denoising step")
    ax.set_title(title or "skip plan (dark: runs)", fontsize=10)
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, quality)`` that no other point beats: none has a cost as low and a quality as
    high, and one of them better. In order of cost."""
    keep = [i for i, (c, q) in enumerate(points)
            if not any(c2 <= c and q2 >= q and (c2, q2) != (c, q) for c2, q2 in points)]
    return sorted(keep, key=lambda i: points[i])


def pareto_figure(rows: Sequence[dict], metric: str = "psnr", title: str = ""):
    """Quality (``metric`` against the full model) against ``macs_ratio``, one point per bench row, labelled; the
    rows no other row beats in both are joined by a line (the best trade-offs). Labels that would overlap (rows of
    equal MACs, such as every 10-step schedule) are stacked below one another, each tied to its point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = []
    for r in rows:
        y = r.get(metric)
        if y is None or r.get("method") == "full" or not math.isfinite(float(y)):
            continue
        pts.append((float(r["macs_ratio"]), float(y), str(r["method"])))
        ax.scatter(pts[-1][0], pts[-1][1], s=28)
    front = pareto_front([(x, y) for x, y, _ in pts])
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="0.45", lw=1, ls="--", zorder=0)
        title = (title + "\n" if title else "") + f"dashed: the best trade-offs (no other row has fewer MACs and a " \
            f"higher {metric})"
    ax.set_xlabel("MACs of the sampling run / full")
    ax.set_ylabel(f"{metric} vs full")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _place_labels(fig, ax, pts, fontsize=7)
    return fig


def _place_labels(fig, ax, pts: Sequence[tuple[float, float, str]], fontsize: float) -> None:
    """Annotate each point ``(x, y, label)``: to its right, or to its left where the label would leave the axes; moved
    down (a line at a time) while it would overlap a label placed before, then with a thin line to its point. The
    boxes are estimated from the labels' lengths."""
    scale = 72.0 / fig.dpi  # display pixels to points, the unit of the offsets
    right = ax.transAxes.transform((1, 0))[0] * scale
    line, char = fontsize * 1.25, fontsize * 0.62
    placed: list[tuple[float, float, float, float]] = []
    for x, y, label in sorted(pts, key=lambda p: (-p[1], p[0])):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        w = char * len(label)
        dx = 3.0 if px + 3 + w <= right else -3.0 - w  # left of the point near the right edge
        dy = 3.0
        while any(px + dx < b[2] and b[0] < px + dx + w and py + dy < b[3] and b[1] < py + dy + line
                  for b in placed):
            dy -= line
        placed.append((px + dx, py + dy, px + dx + w, py + dy + line))
        ax.annotate(label, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                    arrowprops=None if dy == 3.0 else dict(arrowstyle="-", color="0.6", lw=0.5, shrinkA=0,
                                                            shrinkB=2))


# ---------------------------------------------------------------------------------------------
# The guided workflow: the path of the stacked stages in cost and quality


def workflow_figure(rows: Sequence[dict], metric: str = "psnr", floor: Optional[float] = None, title: str = "",
                    branches: Sequence[dict] = ()):
    """The workflow's path: ``metric`` against the original's outputs vs MACs ratio, stage after stage.

    Accepted stages are joined by arrows from the original (MACs ratio 1); a rejected stage is a red cross; the
    settings an ``auto`` stage tried (its row's ``search``) are small grey dots, hollow where they missed the floor;
    the results of the other stacks a joint search tried (``branches`` not chosen) are orange diamonds;
    ``floor`` is drawn as a dashed line. The original's own PSNR is infinite: it is a hollow triangle on the plot's
    top edge, joined to the first stage by a dotted line, so that no drop from it reads as measured."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = [(r["macs_ratio"], float(r[metric]), r) for r in rows[1:] if r.get(metric) is not None
           and math.isfinite(float(r[metric]))]
    tried = [(t["macs_ratio"], float(t[metric]), t["accepted"]) for r in rows[1:] for t in r.get("search") or []
             if t.get(metric) is not None and math.isfinite(float(t[metric]))]
    others = [(b["macs_ratio"], float(b[metric])) for b in branches if not b.get("chosen")
              and b.get(metric) is not None and math.isfinite(float(b[metric]))]
    values = [p[1] for p in pts] + [t[1] for t in tried] + [o[1] for o in others] + ([floor] if floor is not None
                                                                                      else [])
    if values:  # room under the top edge for the original's label
        lo, hi = min(values), max(values)
        span = max(hi - lo, 0.5)
        ax.set_ylim(lo - 0.1 * span, hi + 0.3 * span)
    path = [p for p in pts if p[2].get("accepted", True)]
    edge = ax.get_xaxis_transform()  # x in data, y in axes fractions: the original sits on the top edge, off the scale
    ax.scatter([1.0], [1.0], transform=edge, marker="^", s=60, zorder=3, facecolors="none", edgecolors="tab:blue",
               clip_on=False)
    ax.annotate(f"{rows[0]['stage']} (the reference: {metric} infinite)", (1.0, 1.0), xycoords=edge, fontsize=8,
                ha="right", va="bottom", xytext=(-6, 3), textcoords="offset points")
    if path:
        ax.annotate("", path[0][:2], (1.0, 1.0), textcoords=edge, arrowprops=dict(
            arrowstyle="->", color="tab:blue", lw=1.2, ls=":", shrinkA=4, shrinkB=5))
    for (x0, y0, _), (x1, y1, _) in zip(path, path[1:]):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2, shrinkB=5))
    for x, y, r in path:
        ax.scatter(x, y, color="tab:blue", s=30, zorder=3)
        ax.annotate(str(r["stage"]), (x, y), fontsize=8, xytext=(6, -10), textcoords="offset points")
    if tried:
        for ok in (True, False):
            xs = [(x, y) for x, y, a in tried if a == ok]
            if xs:
                ax.scatter(*zip(*xs), s=14, zorder=2, color="0.55", facecolors="0.55" if ok else "none",
                           label="tried by auto, " + ("met its floor" if ok else "missed its floor"))
    if others:
        ax.scatter(*zip(*others), marker="D", s=22, zorder=2, color="tab:orange",
                   label="other stacks the joint search tried (their results)")
    for x, y, r in pts:
        if not r.get("accepted", True):
            ax.scatter(x, y, color="tab:red", marker="x", s=50, zorder=3)
            ax.annotate(f"{r['stage']} (rejected)", (x, y), fontsize=8, color="tab:red", xytext=(4, -10),
                        textcoords="offset points")
    if floor is not None:
        ax.axhline(floor, color="tab:red", ls="--", lw=0.8, label=f"floor {floor:g}")
    if floor is not None or tried or others:
        ax.legend(fontsize=8)
    ax.set_xlabel("MACs of the sampling run / original")
    ax.set_ylabel(f"{metric.upper() + ' (dB)' if metric == 'psnr' else metric} vs the original's outputs")
    ax.set_xlim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def _reference_caption(references: Optional[dict]) -> str:
    return f"; above them: {' and '.join(references)}" if references else ""


def add_workflow_section(rep, model: str, result, floor: Optional[dict] = None, recipe_file: Optional[str] = None,
                         references: Optional[dict] = None, timing: Optional[str] = None) -> None:
    """The workflow's rows, how to read them (inputs, floor, skipped metrics; ``recipe_file``: the result's recipe,
    relative to the report, and how to load it; ``timing``: the run's timing-noise line,
    :func:`diffslim.bench.timing_note`), its path in cost and quality, and one image grid per stage."""
    tag = slug(model)
    rows = result.rows
    cols = [c for c in ("stage", "kind", "params", "macs_ratio", "speedup", "psnr", "ssim", "digit_accuracy",
                        "psnr_gt", "ssim_gt", "accepted", "notes") if any(c in r for r in rows)]
    rep.add_table(f"workflow: {model}", rows, cols, key="stage")
    n = len(next(iter(result.outputs.values()))) if result.outputs else 0
    floors = ", ".join(f"{k} >= {v:g}" for k, v in (floor or {}).items())
    lines = [f"every stage samples the same {n} inputs and seeds as the original and is judged against the "
             f"original's outputs; " + (f"floor: {floors}" if floors else "no floor: every stage is kept")]
    if recipe_file:
        lines.append(f"{recipe_file} (beside this page) is the result: diffslim.from_recipe(\"{recipe_file}\") loads "
                     f"{result.recipe.model or 'its model'} and applies its schedule and skip plan")
    lines += skip_lines(rows, "stage") + ([timing] if timing else [])
    rep.add_text(f"how to read it: {model}", "\n".join(lines))
    if result.stopped:
        rep.add_text("stopped early", result.stopped)
    branches = result.branches
    if branches:
        rep.add_table(f"joint search: every stack tried on {model} (the chosen one's stages above)",
                      [{**b, "kept": ", ".join(b["kept"]) or "none", "chosen": "yes" if b["chosen"] else ""}
                       for b in branches],
                      [c for c in ("stages", "kept", "params", "macs_ratio", "psnr", "ssim", "digit_accuracy",
                                   "psnr_gt", "ssim_gt", "chosen") if any(c in b for b in branches)])
    metric = "psnr" if any("psnr" in r for r in rows[1:]) else None
    if metric is not None:
        rep.add_figure(f"the path of the stages: {model}", f"workflow_{tag}.png",
                       workflow_figure(rows, metric, (floor or {}).get(metric), model, branches),
                       "each stage's PSNR against the original's outputs vs the MACs of its sampling run; arrows "
                       "join the accepted stages in order")
    if len(result.outputs) > 1:
        k = min(8, min(len(v) for v in result.outputs.values()))
        rep.add_figure(f"workflow samples side by side: {model}", f"workflow_grid_{tag}_all.png",
                       labelled_grid({**(references or {}), **result.outputs}, k),
                       f"one row per stage, the first {k} inputs in the same order" + _reference_caption(references))
    for label, imgs in result.outputs.items():
        k = min(16, len(imgs))
        up = max(1, 64 // imgs.shape[-1])
        name = "".join(c if c.isalnum() else "-" for c in label)
        rep.add_figure(f"workflow samples: {model} / {label}", f"workflow_grid_{tag}_{name}.png", image_grid(imgs[:k], nrow=8, upscale=up),
                       f"first {k} outputs, same seeds and inputs as the original")
