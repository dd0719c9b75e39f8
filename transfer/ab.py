"""A/B report between two runs: ``python -m transfer.ab RUN_A RUN_B --out REPORT_DIR``.

RUN_A and RUN_B are output folders (ours in either layout, ``python -m transfer.reference``'s, cosmos-transfer1's
``--video_save_folder``, cosmos-transfer2.5's ``-o`` folder, or any folder of mp4s with matching names) or single
video files. Videos are matched by file stem (a sample's name); computed control files (``*_input_control_*``) and
Transfer2.5's ``<name>_control_<key>.mp4`` / ``<name>_mask_<key>.mp4`` are not outputs and are ignored.

Before pixels, each pair's settings are read from each side -- ``<name>.json`` (Transfer2.5's resolved
arguments, also written by this fork's ``-i`` form), else this fork's ``manifest.json``, else ``<name>.txt`` (the
prompt, all cosmos-transfer1 writes) -- and a pair whose seed, steps, guidance, resolution, controls (weights) or
prompt differ where both sides say is reported as ``settings differ`` with the differences (its pixels are still
compared, but the difference is expected). For each pair:

- frame count and size (a mismatch is reported and the pair is not compared further);
- PSNR (per frame and over the video; ``inf`` when identical), SSIM (scikit-image, per frame and
  mean), max absolute difference (0..255);
- the distance between the VAE encoder's deterministic latents of the two videos
  (``latent_dist.mode()``, normalised, as ``transfer.represent`` gives them): cosine similarity and
  L2 distance per latent frame;
- side-by-side frames (A | B | 4 x |A - B|) at chunk boundaries (``--num_frames_per_chunk`` /
  ``--num_conditional_frames`` of the runs), PNG plots of per-frame PSNR and per-latent-frame
  distance.

Frames come from ``{name}.npz`` (``--save_raw``: the exact frames, before H.264) when both sides
have one, else from the decoded mp4s. Timings come from each run's ``timings.json``
(``transfer.reference``) or ``trace.json`` (``--trace``) when present. Output: ``report.html``,
``report.json`` and the PNGs in REPORT_DIR. Videos found on one side only are listed.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from configs.controls import MODALITIES
from transfer.errors import TransferError
from transfer.video_io import atomic_path, read_video, write_text

CONTROL_MARK = "_input_control_"
#: Transfer2.5's per-sample side files: ``<name>_control_<key>.mp4``, ``<name>_mask_<key>.mp4``.
SIDE_FILE = re.compile(r"^(?P<name>.+)_(control|mask)_(edge|depth|vis|seg|keypoint)$")
#: The settings compared before pixels (``sample_settings``).
COMPARED = ("seed", "num_steps", "guidance", "resolution", "controls", "prompt")


def collect(run: Path) -> dict[str, Path]:
    """Video files of a run, by stem (side files of a Transfer2.5 layout left out)."""
    if run.is_file():
        return {run.stem: run}
    if not run.is_dir():
        raise TransferError(f"{run}: no such file or folder")
    videos = {p.stem: p for p in sorted(run.glob("*.mp4")) if CONTROL_MARK not in p.name and not p.name.startswith(".")}
    side = {n for n in videos if (m := SIDE_FILE.match(n)) and m["name"] in videos}
    return {n: p for n, p in videos.items() if n not in side}


def sample_settings(video: Path) -> dict:
    """What a run says about how ``video`` was made (the ``COMPARED`` keys it knows; absent ones are unknown)."""
    folder, name = video.parent, video.stem
    record = folder / f"{name}.json"
    if record.is_file():  # Transfer2.5 layout: the resolved arguments
        try:
            d = json.loads(record.read_text())
        except ValueError as e:
            raise TransferError(f"{record}: not valid JSON: {e}") from None
        if isinstance(d, dict):
            controls = {k: float(v.get("control_weight", 1.0)) for k, v in d.items()
                        if k in MODALITIES and isinstance(v, dict)}
            out = {k: d.get(k) for k in COMPARED if k != "controls"}
            if out.get("resolution") is not None:
                out["resolution"] = str(out["resolution"])
            return {**out, "controls": controls or None}
    manifest = folder / "manifest.json"
    if manifest.is_file():  # this fork's transfer1 layout
        entry = json.loads(manifest.read_text()).get("requests", {}).get(name, {}).get("settings")
        if entry:
            gen = entry.get("generation", {})
            resolution = (entry.get("transfer2.5") or {}).get("resolution")
            return {"seed": entry.get("seed"), "num_steps": gen.get("num_steps"), "guidance": gen.get("guidance"),
                    "resolution": None if resolution is None else str(resolution), "prompt": entry.get("prompt"),
                    "controls": {m: float(c["weight"]) for m, c in entry.get("controls", {}).items()}}
    prompt = folder / f"{name}.txt"
    return {"prompt": prompt.read_text().strip()} if prompt.is_file() else {}


def settings_differences(a: dict, b: dict) -> list[str]:
    """``key: A -> B`` for every compared setting both sides know and that differs."""
    out = []
    for key in COMPARED:
        va, vb = a.get(key), b.get(key)
        if key == "prompt" and isinstance(va, str) and isinstance(vb, str):
            va, vb = va.strip(), vb.strip()
        if va is not None and vb is not None and va != vb:
            short = [json.dumps(v)[:60] for v in (va, vb)]
            out.append(f"{key}: {short[0]} vs {short[1]}")
    return out


def load_frames(video: Path, lossless: bool) -> np.ndarray:
    if lossless:
        with np.load(video.with_suffix(".npz")) as z:
            return z["frames"]
    return read_video(video)[0]


def has_npz(video: Path) -> bool:
    npz = video.with_suffix(".npz")
    if not npz.is_file():
        return False
    with np.load(npz) as z:
        return "frames" in z.files


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def latent_distance(vae, a: np.ndarray, b: np.ndarray) -> dict:
    """Per latent frame cosine similarity and L2 distance of the two videos' VAE latents."""
    from transfer.represent import encode_frames

    la, lb = encode_frames(vae, a), encode_frames(vae, b)  # [T', h, w, 16]
    fa, fb = la.reshape(len(la), -1).astype(np.float64), lb.reshape(len(lb), -1).astype(np.float64)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
    return {"cosine": cos.tolist(), "l2": np.linalg.norm(fa - fb, axis=1).tolist(), "latent_frames": len(la)}


def boundaries(num_frames: int, per_chunk: int, cond: int) -> list[int]:
    """First frame of each chunk after the first (where its new frames begin)."""
    from transfer.chunks import plan_chunks

    try:
        chunks = plan_chunks(num_frames, per_chunk, cond)
    except TransferError:
        return []
    return [start + cond for start, _ in chunks[1:] if start + cond < num_frames]


def timings(run: Path) -> dict | None:
    folder = run if run.is_dir() else run.parent
    if (folder / "timings.json").is_file():
        data = json.loads((folder / "timings.json").read_text())
        return {"source": "timings.json", "seconds": data.get("seconds")}
    if (folder / "trace.json").is_file():
        other = json.loads((folder / "trace.json").read_text()).get("otherData", {})
        return {"source": "trace.json", "wall_s": other.get("wall_s"), "placement": other.get("placement")}
    return None


def save_side_by_side(out: Path, a: np.ndarray, b: np.ndarray, frames: list[int]) -> None:
    """Rows of A | B | 4 x |A - B| for the given frame indices."""
    import imageio.v3 as iio

    rows = []
    for t in frames:
        diff = np.clip(np.abs(a[t].astype(np.int16) - b[t].astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        gap = np.full((a.shape[1], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([a[t], gap, b[t], gap, diff], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    with atomic_path(out) as tmp:
        iio.imwrite(tmp, np.concatenate(rows[:-1], axis=0))


def plot(out: Path, series: dict[str, list[float]], xlabel: str, ylabel: str, marks: list[int] = (), title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    for m in marks:
        ax.axvline(m, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def compare(name: str, a_path: Path, b_path: Path, out: Path, vae, per_chunk: int, cond: int) -> dict:
    lossless = has_npz(a_path) and has_npz(b_path)
    a, b = load_frames(a_path, lossless), load_frames(b_path, lossless)
    settings = {"a": sample_settings(a_path), "b": sample_settings(b_path)}
    entry = {"a": str(a_path), "b": str(b_path), "frames_from": "npz" if lossless else "mp4",
             "shape_a": list(a.shape), "shape_b": list(b.shape), "settings": settings,
             "settings_differ": settings_differences(settings["a"], settings["b"])}
    if a.shape != b.shape:
        entry["error"] = f"shape differs: A {tuple(a.shape)} vs B {tuple(b.shape)}"
        return entry
    per_frame = [psnr(x, y) for x, y in zip(a, b)]
    entry.update(psnr=psnr(a, b), psnr_per_frame=per_frame, ssim_per_frame=[ssim(x, y) for x, y in zip(a, b)],
                 max_abs_diff=int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
                 chunk_boundaries=boundaries(len(a), per_chunk, cond))
    entry["ssim"] = float(np.mean(entry["ssim_per_frame"]))
    if vae is not None:
        entry["latent"] = latent_distance(vae, a, b)
    marks = entry["chunk_boundaries"]
    shown = sorted({t for m in marks for t in (m - 1, m)} or {0, len(a) // 2, len(a) - 1})
    entry["side_by_side"] = f"{name}_frames.png"
    entry["side_by_side_frames"] = shown
    save_side_by_side(out / entry["side_by_side"], a, b, shown)
    finite = [p if math.isfinite(p) else 100.0 for p in per_frame]
    entry["psnr_plot"] = f"{name}_psnr.png"
    plot(out / entry["psnr_plot"], {"PSNR (inf drawn at 100)": finite}, "frame", "dB", marks, f"{name}: PSNR per frame")
    if vae is not None:
        entry["latent_plot"] = f"{name}_latent.png"
        plot(out / entry["latent_plot"], {"cosine": entry["latent"]["cosine"]}, "latent frame", "cosine similarity",
             title=f"{name}: VAE latent cosine similarity (L2 in report.json)")
    return entry


def render_html(report: dict) -> str:
    e = html.escape
    rows = []
    for name, v in report["videos"].items():
        if v.get("settings_differ"):
            rows.append(f"<tr><td>{e(name)}</td><td colspan=6><b>settings differ</b>: "
                        f"{e('; '.join(v['settings_differ']))}</td></tr>")
        if "error" in v:
            rows.append(f"<tr><td>{e(name)}</td><td colspan=6>{e(v['error'])}</td></tr>")
            continue
        latent = v.get("latent")
        lat = f"{min(latent['cosine']):.4f}" if latent else "-"
        rows.append(f"<tr><td>{e(name)}</td><td>{v['shape_a'][0]} x {v['shape_a'][2]}x{v['shape_a'][1]}</td>"
                    f"<td>{v['psnr']:.2f}</td><td>{v['ssim']:.4f}</td><td>{v['max_abs_diff']}</td><td>{lat}</td>"
                    f"<td>{e(v['frames_from'])}</td></tr>")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>A/B report</title>"
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
             "img{max-width:100%;margin:6px 0}</style></head><body>",
             f"<h1>A/B report</h1><p>A = <code>{e(report['a'])}</code><br>B = <code>{e(report['b'])}</code></p>",
             "<table><tr><th>video</th><th>frames x size</th><th>PSNR dB</th><th>SSIM</th><th>max |A-B|</th>"
             "<th>min latent cosine</th><th>frames from</th></tr>", *rows, "</table>"]
    for side in ("only_in_a", "only_in_b"):
        if report[side]:
            parts.append(f"<p><b>{side.replace('_', ' ')}:</b> {e(', '.join(report[side]))}</p>")
    for side in ("a", "b"):
        if report["timings"][side]:
            parts.append(f"<p>timings {side.upper()}: <code>{e(json.dumps(report['timings'][side]))}</code></p>")
    for name, v in report["videos"].items():
        if "error" in v:
            continue
        parts.append(f"<h2>{e(name)}</h2><p>frames {v['side_by_side_frames']} (chunk boundaries "
                     f"{v['chunk_boundaries'] or 'none'}): A | B | 4 x |A - B|</p>")
        parts.append(f"<img src='{e(v['side_by_side'])}' alt='side by side'>")
        parts.append(f"<img src='{e(v['psnr_plot'])}' alt='PSNR per frame'>")
        if "latent_plot" in v:
            parts.append(f"<img src='{e(v['latent_plot'])}' alt='latent distance'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--out", type=Path, required=True, help="report folder (report.html, report.json, PNGs)")
    p.add_argument("--checkpoint_dir", help="checkpoint whose VAE encodes the latents (default: the embedded tiny one)")
    p.add_argument("--no_latents", action="store_true", help="skip the VAE latent distance")
    p.add_argument("--num_frames_per_chunk", type=int, default=93, help="the runs' chunk length, for boundaries (default: 93)")
    p.add_argument("--num_conditional_frames", type=int, default=1, help="the runs' overlap (default: 1)")
    args = p.parse_args(argv)
    try:
        a, b = collect(args.run_a), collect(args.run_b)
        if args.run_a.is_file() and args.run_b.is_file():
            b = {args.run_a.stem: args.run_b}  # two files: compare them whatever their names
        common = sorted(set(a) & set(b))
        if not common:
            raise TransferError(f"no video name is in both {args.run_a} and {args.run_b}")
        vae = None if args.no_latents else load_encoder(args.checkpoint_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"a": str(args.run_a), "b": str(args.run_b), "only_in_a": sorted(set(a) - set(b)),
                  "only_in_b": sorted(set(b) - set(a)), "timings": {"a": timings(args.run_a), "b": timings(args.run_b)},
                  "videos": {n: compare(n, a[n], b[n], args.out, vae, args.num_frames_per_chunk,
                                        args.num_conditional_frames) for n in common}}
    except TransferError as e:
        print(f"python -m transfer.ab: error: {e}", file=sys.stderr)
        return 2
    write_text(args.out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(args.out / "report.html", render_html(report))
    for n, v in report["videos"].items():
        if v["settings_differ"]:
            print(f"{n}: settings differ: {'; '.join(v['settings_differ'])}")
        line = v.get("error") or f"PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, max |A-B| {v['max_abs_diff']}"
        print(f"{n}: {line}")
    for side in ("only_in_a", "only_in_b"):
        if report[side]:
            print(f"{side.replace('_', ' ')}: {', '.join(report[side])}")
    print(f"report: {args.out / 'report.html'}")
    return 0


def load_encoder(checkpoint_dir: str | None):
    """Only the VAE of the checkpoint (no text encoder, no DiT)."""
    from transfer.represent import load_vae_only

    return load_vae_only(checkpoint_dir)


if __name__ == "__main__":
    sys.exit(main())
