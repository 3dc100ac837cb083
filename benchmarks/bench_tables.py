"""The results of ``make bench`` as tables: one builder of rows (:func:`part_rows`,
:func:`target_rows`) that the text for the terminal (:func:`text`) and the markdown for
the README (:func:`markdown`) both render, through the harness's one table renderer."""
from __future__ import annotations

from harness import markdown_table, text_table

from bench_parts import (CHECKS_PER_SEC_TARGET, FULL_PARTS, LLMC_SECONDS, LLMC_STEPS, LLMC_TARGET, MEMORY_TARGET,
                         MODEL_PARTS, OVERHEAD_TARGET, d24_config)

PART_HEADER = ("part", "first step", "warm step", "phases (warm, s)", "peak RSS", "held (above baseline)",
               "held by config")
TARGET_HEADER = ("target", "measured", "verdict")


def _f(x, unit="", digits=3):
    if x is None:
        return "-"
    if unit == " MiB" and isinstance(x, (int, float)):
        return f"{x:,.0f} MiB"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _model_row(name: str, r: dict, analytic: dict) -> tuple[str, ...]:
    if "step" not in r:
        return (name, "-", "-", (r.get("status", "?") + ": " + str(r.get("why", "")))[:70], "-", "-", "-")
    ph = " ".join(f"{ {'forward': 'fwd', 'zero_grad': 'zero', 'backward': 'bwd'}.get(k, k)} {v:.3g}"
                  for k, v in r["phases_median_s"].items())
    if name == "witness_step":
        ph += f" (build {r['construct_s']:.2g})"
    return (name + (" *" if r.get("reused_from") else ""), _f(r["first_step_s"], " s"),
            _f(r["step"]["median_s"], " s"), ph, _f(r["peak_rss_mib"], " MiB"),
            _f(r["model_peak_mib"], " MiB"), _f(analytic.get(name.replace("_1t", "")), " MiB"))


def _full_row(name: str, mode, fc: dict) -> tuple[str, ...]:
    if fc.get("status") != "ran":
        return (name, "-", "-", f"{fc.get('status', '?')}: {fc.get('why', '')}"[:70], "-", "-", "-")
    note = (f"replay={mode!r}, {'passed' if fc['passed'] else 'FAILED'}, "
            f"{sum(fc['checks_by_kind'].values())} checks, setup {fc['setup_s']:.2g} s")
    return (name + (" *" if fc.get("reused_from") else ""), _f(fc["first_step_s"], " s"),
            _f(fc.get("warm_step_s"), " s"), note, _f(fc["peak_rss_mib"], " MiB"),
            _f(fc["model_peak_mib"], " MiB"), "")


def part_rows(results: dict) -> list[tuple[str, ...]]:
    """A row per part that ran: its first and warm step, its phases, its memory."""
    parts, mem, ov = results["parts"], results.get("memory", {}), results.get("overhead", {})
    analytic = mem.get("analytic_per_part_mib", {})
    rows = [_model_row(name, parts[name], analytic) for name in (*MODEL_PARTS, "c_step_1t") if name in parts]
    if "sum_warm_s" in ov:
        rows.append(("sum of the 5 parts", _f(ov["sum_first_s"], " s"), _f(ov["sum_warm_s"], " s"), "", "",
                     _f(mem.get("measured_sum_mib"), " MiB"), _f(mem.get("analytic_sum_mib"), " MiB")))
    rows += [_full_row(name, mode, parts[name]) for name, mode in FULL_PARTS.items() if name in parts]
    return rows


def _time_row(name: str, r: dict) -> tuple[str, str, str]:
    warm = (f"; warm step {r['warm_vs_necessary']:.3g} x necessary, {r['warm_vs_warm']:.3g} x all"
            if "warm_vs_necessary" in r else "")
    return (f"{name}: time <= {OVERHEAD_TARGET} x its necessary parts (C, numpy, torch, oracle alone)",
            f"first step {r['first_vs_necessary']:.3g} x the necessary parts, {r['first_vs_first']:.3g} x all "
            f"parts{warm} (whole call {r['whole_call']:.3g}; judged on {r['target_judged_on'].replace('_', ' ')}); "
            f"{_f(r.get('first_vs_necessary_in_check'))} x the necessary models' own time inside the check",
            _met(r["meets_target"]))


def _memory_row(name: str, r: dict, mem: dict) -> tuple[str, str, str]:
    return (f"{name}: peak memory <= {MEMORY_TARGET:g} x the C model's own footprint",
            f"peak above baseline {r['peak_above_baseline_mib']:,.0f} MiB = {r['vs_c_footprint']:.3g} x the C "
            f"model's footprint ({mem['c_footprint_mib']:,.0f} MiB by config"
            + (f", {mem['c_measured_mib']:,.0f} measured" if "c_measured_mib" in mem else "")
            + f"); {r['vs_analytic']:.3g} x all five models by config ({mem['analytic_sum_mib']:,.0f} MiB)"
            + (f"; peak reached in {r['peak_reached_in']}" if r.get("peak_reached_in") else ""),
            _met(r["meets_target"]))


def target_rows(results: dict) -> list[tuple[str, str, str]]:
    """A row per target: what it asks, what was measured, met or not."""
    parts, mem, ov = results["parts"], results.get("memory", {}), results.get("overhead", {})
    rows = [_time_row(name, ov[name]) for name in FULL_PARTS if name in ov]
    rows += [_memory_row(name, mem[name], mem) for name in FULL_PARTS if name in mem]
    lc = ov.get("llmc_command", {})
    for name, how in (("llmc_command", ""), ("llmc_command_unheld", ", freed memory returned to the system")):
        r = ov.get(name, {})
        if "wall_s" not in r:
            continue
        steps = "" if r.get("first_step_s") is None else \
            f"; step 1 {r['first_step_s']:.0f} s, later steps {r['later_steps_median_s']:.0f} s (median)"
        peak = "" if r.get("peak_rss_mib") is None else f"; peak RSS {r['peak_rss_mib'] / 1024:.1f} GiB"
        rows.append((f"the README's llm.c command ({LLMC_STEPS} steps, --debug-state, defaults{how}): "
                     f"<= {LLMC_TARGET:g} x its necessary parts and <= {LLMC_SECONDS / 60:.0f} min",
                     f"{r['wall_s']:.0f} s = {r['vs_necessary']:.3g} x its necessary parts ({LLMC_STEPS + 1} x "
                     f"(the C's step + the oracle's) = {r['necessary_s']:.0f} s){steps}{peak}; verdict "
                     f"{'PASS' if r['passed'] else 'FAIL'}", _met(r["meets_target"])))
    if "wall_s" in lc:
        est = "-" if lc.get("estimate_s") is None else \
            f"{lc['estimate_s']:.0f} s, {100 * lc['estimate_off']:+.0f}% of its {lc['wall_s']:.0f} s"
        if lc.get("estimate_after_step2_s") is not None:
            est += (f"; after step 2: {lc['estimate_after_step2_s']:.0f} s, "
                    f"{100 * lc['estimate_after_step2_off']:+.0f}%")
        rows.append((f"the llm.c command's header estimate within {100 * lc['estimate_target']:.0f}% of its time",
                     est, _met(lc["estimate_meets_target"])))
    d24 = parts.get("full_check_d24")
    if d24 is not None:
        fits = d24.get("status") == "ran" and d24["passed"] and d24["peak_rss_mib"] * 2**20 < 24e9
        rows.append(("full_check_d24: a one-step check of d24 on a 24 GB machine", d24_line(d24), _met(fits)))
    oc = parts.get("op_checks", {})
    if "per_kernel" in oc:
        worst = min(oc["per_kernel"], key=lambda k: oc["per_kernel"][k]["calls_per_s"])
        one = ", met with 1 thread" if oc["meets_target_1thread"] else ""
        rows.append((f"op checks >= {CHECKS_PER_SEC_TARGET:.0f} check_kernel calls/s",
                     f"min {oc['min_calls_per_s']:.0f}/s ({worst}), {oc['min_calls_per_s_1thread']:.0f}/s with 1 C "
                     "thread", _met(oc["meets_target"]) + one))
    elif "op_checks" in parts:
        why = (str(oc.get("why")).strip().splitlines() or [""])[-1]   # an exception's last line
        rows.append(("op checks", f"{oc.get('status')}: {why[:200]}", "-"))
    return rows


def d24_line(r: dict) -> str:
    """The d24 (GPT-2 medium shape) one-step check in a line: time, peak RSS, verdict."""
    if r.get("status") != "ran":
        return f"full_check_d24 (d24, B=4, T=64): {r.get('status')}: {str(r.get('why', ''))[:300]}"
    kinds = ", ".join(f"{v} {k}" for k, v in r["checks_by_kind"].items())
    return (f"full_check_d24 (d24, {d24_config().num_parameters() / 1e6:.1f}M parameters, B=4, T=64, one step): "
            f"completed in {r['first_step_s']:.3g} s "
            f"(whole call {r['wall_s']:.3g} s), {'passed' if r['passed'] else 'FAILED'} ({kinds}); "
            f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB ({r['model_peak_mib'] / 1024:.2f} GiB above its "
            f"baseline of interpreter, imports, generated parameters); fits 24 GB: "
            f"{'yes' if r['peak_rss_mib'] * 2**20 < 24e9 else 'NO'}"
            + (f"; peak reached in {r['peak_reached_in']}" if r.get("peak_reached_in") else ""))


def breakdown_lines(results: dict) -> list[str]:
    """Where each full check's (warm, else first) step goes: the models, the harness."""
    lines = []
    for name in FULL_PARTS:
        split = results.get("overhead", {}).get(name, {}).get("split", {})
        label = "warm" if "warm" in split else "first"
        if label not in split:
            continue
        sp = split[label]
        top = [(k, v) for k, v in sp["harness_categories_s"].items() if v >= 0.01 * sp["step_s"]]
        lines += ["", f"where {name}'s {label} step goes ({sp['step_s']:.3g} s): the models "
                      f"{sp['models_in_check_s']:.3g} s (alone {sp['models_alone_s']:.3g} s), the harness "
                      f"{sp['harness_s']:.3g} s",
                  "  models, in the check / alone: " + ", ".join(
                      f"{cat} {a:.3g}/{b:.3g}" for cat, (a, b) in sp["models_in_check_vs_alone"].items())
                  + f" (the witness's noise {sp['witness_noise_s']:.3g})",
                  "  harness: " + ", ".join(f"{k} {v:.3g}" for k, v in top)]
    return lines


def warming_line(results: dict) -> str:
    """What warming the memory did before the parts ran: first touch cold and warm."""
    w = results.get("memory_warming")
    if not w:
        return "memory: not warmed before the parts ran (--no-warm)"
    c, h = w["cold"], w["warm"]
    return (f"memory: {w['warmed_gib']:.1f} GiB warmed before the parts ran ({w['seconds']:.0f} s); a fresh page's "
            f"first touch {c['first_touch_ns_per_page'] / 1e3:.2g} us cold, {h['first_touch_ns_per_page'] / 1e3:.2g} us "
            f"warm (a touched page {h['touched_ns_per_page'] / 1e3:.2g} us)")


def machine_line(results: dict) -> str:
    m = results["machine"]
    return (f"machine: {m['cpu_model']}, {m['cores_usable']} cores, {m['memory_gib']} GiB, "
            f"load {_load(m.get('load_average'))} -> {_load(m.get('load_average_end'))} "
            f"({_load_range(results['parts'])}); Python {m['python']}, NumPy {m['numpy']}, torch {m.get('torch')}; "
            f"C built with {(m.get('library_build') or {}).get('cflags', '?')}, {m.get('c_openmp_threads')} "
            "OpenMP threads")


def text(results: dict, cfg_label: str) -> str:
    """The results for the terminal: the parts' table, then the targets' rows a line each
    (their measurements are sentences)."""
    reused = sorted({p.get("reused_from") for p in results["parts"].values() if p.get("reused_from")})
    lines = [f"llmc-parity bench: {cfg_label}", *text_table(PART_HEADER, part_rows(results), right={1, 2, 4, 5, 6}),
             "held: peak RSS above the part's own baseline (interpreter, imports, params, batch); "
             "held by config: the buffers the models allocate"]
    if reused:
        lines.append(f"* reused from {', '.join(reused)} (same config, B, T)")
    targets = [f"  {target}: {measured} -> {verdict}" for target, measured, verdict in target_rows(results)]
    lines += ["", "targets:", *targets, *breakdown_lines(results), "", machine_line(results), warming_line(results)]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The same rows as markdown tables (for the README)."""
    cfg = f"{results['config']}, B={results['B']}, T={results['T']}"
    return "\n".join([*markdown_table((cfg, *PART_HEADER[1:]), part_rows(results), right={1, 2, 4, 5, 6}), "",
                      *markdown_table(TARGET_HEADER, target_rows(results)), "", machine_line(results) + ".",
                      warming_line(results) + "."])


def _load_range(parts: dict) -> str:
    loads = [p["load_average_at_start"][0] for p in parts.values() if p.get("load_average_at_start")]
    if not loads:
        return "load average -"
    return f"1-min load average {min(loads):.1f} to {max(loads):.1f} as the parts started"


def _load(la) -> str:
    return "-" if not la else "/".join(f"{x:.1f}" for x in la)
