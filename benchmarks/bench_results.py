"""What ``make bench``'s parts add up to: the full check's time against its parts'
(:func:`overhead`) and its memory against what the models hold by construction
(:func:`memory`), each judged against its target."""
from __future__ import annotations

from math import prod

from harness.arbiter.oracle import mem_available as mem_available_bytes  # the one reading of MemAvailable

from bench_parts import (D24, ESTIMATE_TARGET, FULL_PARTS, LLMC_SECONDS, LLMC_STEPS, LLMC_TARGET, MEMORY_TARGET, MODEL_CATEGORIES,
                         MODEL_PARTS, NECESSARY_PARTS, OVERHEAD_TARGET, d24_config)


def held_bytes(cfg, B: int, T: int) -> dict:
    """What each model holds by construction: P parameters, A activations (for B, T)."""
    from pyref.config import act_shapes
    P = cfg.num_parameters()
    A = sum(prod(s) for s in act_shapes(cfg, B, T).values())
    f32_train = 4 * (4 * P + 2 * A)     # params, grads, m, v, acts, grads_acts
    f64_fwd_bwd = 8 * (2 * P + 2 * A)   # params, grads, acts, grads_acts (no update: no m, v)
    per = {"c_step": f32_train, "numpy_step": f32_train, "torch_step": f32_train,
           "oracle_step": f64_fwd_bwd, "witness_step": f64_fwd_bwd}
    return {"num_parameters": P, "num_activations": A, "per_part_bytes": per,
            "sum_bytes": sum(per.values()),
            "layout": "C, numpy, torch: float32 params+grads+m+v+acts+grads_acts; "
                      "oracle, witness: float64 params+grads+acts+grads_acts",
            # run_parity keeps, beyond the models: the pre-step m, v (the C updates its own
            # in place), and at step 1 the zero m0, v0 it loads into the references
            "harness_known_extra_bytes": {"pre_step_m_v_copies": 2 * 4 * P}}


def projected_peak_bytes(cfg, B: int, T: int) -> int:
    """What a one-step full check holds at its peak, by config: the C without m, v (they
    are made by its first update, which comes last), the float64 oracle and witness (no
    parameter copies: they read the C's), and the witness's transients on the largest
    gradient (a copy, a difference, a sum of wte's size in float64)."""
    from pyref.config import act_shapes
    P = cfg.num_parameters()
    A = sum(prod(s) for s in act_shapes(cfg, B, T).values())
    wte = cfg.padded_vocab_size * cfg.channels
    return 4 * (2 * P + 2 * A) + 2 * 8 * (P + 2 * A) + 3 * 8 * wte




def d24_room() -> dict | None:
    """None when the machine has the memory for the d24 check now; else why it is skipped
    (it would push a shared machine into the OOM killer: better not run than kill)."""
    cfg = d24_config()
    need = projected_peak_bytes(cfg, D24["B"], D24["T"]) + 4 * cfg.num_parameters() + 2**30
    have = mem_available_bytes()
    if have is None or have >= need:
        return None
    return {"status": "skipped", "projected_peak_gib": need / 2**30, "available_gib": have / 2**30,
            "why": f"needs ~{need / 2**30:.1f} GiB (projected peak, generated parameters, interpreter), "
                   f"{have / 2**30:.1f} GiB available now"}


def overhead(results: dict) -> dict:
    """Full check / the sum of the parts it runs (C, numpy, torch, oracle, witness), warm
    step with warm steps and first with first, for each full-check variant; and, from the
    full check's breakdown, how much of each step is the five models' own work (against
    the same work alone) and how much is the harness's."""
    parts = results["parts"]
    missing = [n for n in MODEL_PARTS if "step" not in parts.get(n, {})]
    if missing:
        return {"why": f"parts missing: {', '.join(missing)}"}
    warm = {n: parts[n]["step"]["median_s"] for n in MODEL_PARTS}
    first = {n: parts[n]["first_step_s"] for n in MODEL_PARTS}
    construct = {n: parts[n].get("construct_s", 0.0) for n in MODEL_PARTS}
    out = {"target": OVERHEAD_TARGET, "sum_warm_s": sum(warm.values()), "sum_first_s": sum(first.values()),
           "necessary_warm_s": sum(warm[n] for n in NECESSARY_PARTS),
           "necessary_first_s": sum(first[n] for n in NECESSARY_PARTS),
           "warm_steps_s": warm, "first_steps_s": first, "construct_s": construct}
    for name in FULL_PARTS:
        fc = parts.get(name, {})
        if fc.get("status") != "ran" or name == "full_check_d24":   # another config: no parts
            continue
        # against the necessary parts (the target) and against all five (the witness too)
        r = {"first_vs_necessary": fc["first_step_s"] / out["necessary_first_s"],
             "first_vs_first": fc["first_step_s"] / out["sum_first_s"]}
        if fc.get("warm_step_s") is not None:
            r["warm_vs_necessary"] = fc["warm_step_s"] / out["necessary_warm_s"]
            r["warm_vs_warm"] = fc["warm_step_s"] / out["sum_warm_s"]
        # the whole run_parity call against what running the parts for as many steps costs
        # (the witness is built every step, the others once)
        n = fc["steps_run"]
        alone = sum(construct.values()) + (n - 1) * construct["witness_step"] \
            + out["sum_first_s"] + (n - 1) * out["sum_warm_s"]
        r["whole_call"] = fc["wall_s"] / alone
        # a one-step check is judged on its step (the first) against the parts' first steps
        r["target_judged_on"] = "first_vs_necessary" if fc["steps_run"] == 1 else "warm_vs_necessary"
        r["meets_target"] = r[r["target_judged_on"]] <= OVERHEAD_TARGET
        r["split"] = split = _split(fc, first, warm)
        # the same ratio inside the check: its step against the necessary models' time in
        # that step (one process, one moment: what the machine's load does not move)
        if "first" in split:
            inside = sum(split["first"]["models_in_check_vs_alone"][c][0] for c in ("C", "numpy", "torch", "oracle"))
            r["first_vs_necessary_in_check"] = split["first"]["step_s"] / inside
        out[name] = r
    out["llmc_command"] = _llmc_command(parts.get("llmc_command", {}), warm)
    if "llmc_command_unheld" in parts:     # the same command returning its freed memory to the system
        out["llmc_command_unheld"] = _llmc_command(parts["llmc_command_unheld"], warm)
    return out


def _llmc_command(lc: dict, warm: dict) -> dict:
    """The README's llm.c command against its necessary parts, measured in the same run: the
    C's and the oracle's steps for each of its steps, and once more for the debug state."""
    if lc.get("status") != "ran":
        return {"why": lc.get("why") or "not run"}
    necessary = (LLMC_STEPS + 1) * (warm["c_step"] + warm["oracle_step"])
    ratio = lc["wall_s"] / necessary
    est = lc.get("estimate_s")
    off = None if est is None else est / lc["wall_s"] - 1.0
    est2 = (lc.get("estimates") or {}).get("step 2", {}).get("estimate_s")   # the header's second estimate
    off2 = None if est2 is None else est2 / lc["wall_s"] - 1.0
    steps = lc.get("steps_s") or []
    return {"wall_s": lc["wall_s"], "necessary_s": necessary, "vs_necessary": ratio, "passed": lc["passed"],
            "hold_freed_memory": lc.get("hold_freed_memory"), "steps_s": steps, "peak_rss_mib": lc.get("peak_rss_mib"),
            "first_step_s": steps[0] if steps else None,
            "later_steps_median_s": sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else None,
            "target": LLMC_TARGET, "seconds_target": LLMC_SECONDS, "header": lc.get("header"),
            "estimate_s": est, "estimate_off": off, "estimate_target": ESTIMATE_TARGET,
            "estimate_after_step2_s": est2, "estimate_after_step2_off": off2,
            "meets_target": ratio <= LLMC_TARGET and lc["wall_s"] <= LLMC_SECONDS,
            "estimate_meets_target": off is not None and abs(off) <= ESTIMATE_TARGET}


def _split(fc: dict, first: dict, warm: dict) -> dict:
    """A full check's first and warm steps, from its breakdown: the five models' own work
    in the check against the same work alone, and the harness's categories."""
    split = {}
    for i, (label, ref) in enumerate((("first", first), ("warm", warm))):
        bds = fc.get("breakdown_per_step_s") or []
        if i >= len(bds):
            continue
        bd, step_s = bds[i], fc["steps_s"][i]
        in_check = {cat: bd.get(cat, 0.0) for cat in MODEL_CATEGORIES}
        in_check["witness"] += bd.get("witness noise", 0.0)    # the witness alone makes it too
        models = sum(in_check.values())
        split[label] = {
            "step_s": step_s,
            "models_in_check_s": models, "models_alone_s": sum(ref.values()),
            "harness_s": step_s - models,
            "models_in_check_vs_alone": {cat: [in_check[cat], ref[part]]
                                         for cat, part in MODEL_CATEGORIES.items()},
            "witness_noise_s": bd.get("witness noise", 0.0),
            "harness_categories_s": {k: v for k, v in bd.items()
                                     if k not in MODEL_CATEGORIES and k != "witness noise"},
        }
    return split


def memory(results: dict, cfg, B: int, T: int) -> dict:
    held = held_bytes(cfg, B, T)
    parts = results["parts"]
    mib = 2**20
    out = {"target": MEMORY_TARGET, "analytic": held,
           "analytic_sum_mib": held["sum_bytes"] / mib,
           "analytic_per_part_mib": {k: v / mib for k, v in held["per_part_bytes"].items()},
           # the C model's own footprint: params, grads, m, v, acts, grads_acts (by config)
           "c_footprint_mib": held["per_part_bytes"]["c_step"] / mib}
    if "model_peak_mib" in parts.get("c_step", {}):
        out["c_measured_mib"] = parts["c_step"]["model_peak_mib"]
    if all("model_peak_mib" in parts.get(n, {}) for n in MODEL_PARTS):
        out["measured_per_part_mib"] = {n: parts[n]["model_peak_mib"] for n in MODEL_PARTS}
        out["measured_sum_mib"] = sum(out["measured_per_part_mib"].values())
    for name in FULL_PARTS:
        fc = parts.get(name, {})
        if "model_peak_mib" not in fc or name == "full_check_d24":
            continue
        r = {"peak_above_baseline_mib": fc["model_peak_mib"], "peak_rss_mib": fc["peak_rss_mib"],
             "vs_analytic": fc["model_peak_mib"] / out["analytic_sum_mib"],
             "vs_c_footprint": fc["model_peak_mib"] / out["c_footprint_mib"]}
        if "measured_sum_mib" in out:
            r["vs_measured_parts"] = fc["model_peak_mib"] / out["measured_sum_mib"]
        r["meets_target"] = r["vs_c_footprint"] <= MEMORY_TARGET
        r["peak_reached_in"] = fc.get("peak_reached_in")
        r["peak_growth_mib_by_category"] = fc.get("peak_growth_mib_by_category")
        out[name] = r
    return out
