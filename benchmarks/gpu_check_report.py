"""The Markdown of `make gpu-check`: one table per section, from the JSON it writes (so a saved JSON can be
rendered again: `python -m benchmarks.gpu_check --render FILE.json`)."""

from __future__ import annotations


def _f(value, fmt: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _train(section: dict) -> list[str]:
    lines = ["| family | overlay | status | loss | step (ms) | images/s | peak memory (MiB) | run (s) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in section["rows"]:
        lines.append(f"| {r['family']} | {r['overlay']} | {r['status'][:120]} | {_f(r.get('loss'), '.3f')} | "
                     f"{_f(r.get('step_ms'))} | {_f(r.get('images_per_s'), '.0f')} | {_f(r.get('peak_mib'), '.0f')} | "
                     f"{_f(r.get('seconds'))} |")
    return lines


def _switches(section: dict) -> list[str]:
    lines = ["| switch | status | images/s off | images/s on | on / off |", "| --- | --- | ---: | ---: | ---: |"]
    for r in section["rows"]:
        off, on = r.get("off") or {}, r.get("on") or {}
        lines.append(f"| {r['switch']} | {r['status'][:120]} | {_f(off.get('images_per_s'), '.0f')} | "
                     f"{_f(on.get('images_per_s'), '.0f')} | {_f(r.get('on_over_off'), '.2f')} |")
    return lines


def _throughput(section: dict) -> list[str]:
    lines = [f"peak {_f(section.get('peak_tflops'), '.1f')} TFLOP/s ({section.get('peak_source', '-')}); references: "
             + ", ".join(f"{k} {v}" for k, v in (section.get("references") or {}).items()), "",
             "| model | implementation | status | batch | images/s | vitx speed-up | TFLOP/s | MFU | peak memory (MiB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in section["rows"]:
        name = f"{'CLIP ' if r.get('family') == 'clip' else ''}ViT-{r.get('size')}" + (
            f" @{r['image_size']}" if r.get("image_size") else "")
        ups = ", ".join(f"{v:.2f}x vs {k.removeprefix('speedup_vs_')}" for k, v in r.items()
                        if k.startswith("speedup_vs_"))
        lines.append(f"| {name} | {r.get('impl', '-')} | {r['status'][:80]} | {r.get('batch_size', '-')} | "
                     f"{_f(r.get('images_per_s'))} | {ups or '-'} | {_f(r.get('tflops'), '.2f')} | "
                     f"{_f(None if r.get('mfu') is None else 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | "
                     f"{_f(r.get('peak_mib'), '.0f')} |")
    return lines


def _data(section: dict) -> list[str]:
    lines = ["| measure | status | workers | batch | px | images/s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in section["rows"]:
        lines.append(f"| {r['measure']} | {r['status'][:80]} | {r.get('workers')} | {r.get('batch_size')} | "
                     f"{r.get('image_size')} | {_f(r.get('images_per_s'), '.0f')} |")
    ratio = section.get("end_to_end_over_synthetic")
    if ratio is not None:
        lines += ["", f"end to end / synthetic: {ratio:.2f}"]
    return lines


TABLES = {"train": _train, "switches": _switches, "throughput": _throughput, "data": _data}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# vitx gpu-check{' (dry run on the CPU: code path only, figures mean nothing)' if result['dry_run'] else ''}",
             "", f"{env['device']}; torch {env['torch']}; {env['date']}; load average {_f(env.get('load_average'), '.2f')}; "
             f"total {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget.", ""]
    lines += ["| section | status | seconds |", "| --- | --- | ---: |"]
    for name, s in result["sections"].items():
        lines.append(f"| {name} | {s['status'][:160]} | {_f(s.get('seconds'))} |")
    for name, s in result["sections"].items():
        lines += ["", f"## {name}: {s['status'][:200]}", ""]
        lines += [f"- {n}" for n in s.get("notes", [])]
        lines += [f"- error: {e.splitlines()[0][:300] if e else ''}" for e in s.get("errors", [])]
        if s.get("notes") or s.get("errors"):
            lines.append("")
        if s["rows"]:
            lines += TABLES[name.split("/")[0]](s)
    return "\n".join(lines) + "\n"
