"""The demo's summary: the numbers that say whether the loop worked, read from the stages' own
results (``accuracy/accuracy.json``, ``eval/results.json``) and checked against the targets.

Targets (the demo world's acceptance): the fine-tuned model beats the base on the judge in at
least 65% of same-seed image pairs with the CI's lower bound above 50%, has a higher mean Social
Reward, and keeps prompt fidelity within 5 points; Social Reward's held-out pairwise accuracy is
at least 80% and above the untrained CLIP's (the CI's lower bound above the CLIP's accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from ..pairs import PairsConfig

JUDGE, REWARD, FIDELITY = "world_judge", "social_reward", "world_fidelity"
UNTRAINED = "clip"
CONTROL_ARM = "random"  # pairs with random roles: the control of an arm that demo.controls does not name
DIRECTION = {"sft": True, "swapped": False, "dpo": True}  # arm -> should it beat its control on the judge (CI clear of 50%)
TARGETS = {"judge_win_rate": 0.65, "judge_ci_low": 0.5, "fidelity_drop_points": 5.0, "reward_accuracy": 0.80}
# Fine-tuning on the pool without the reward's direction should leave the judge at parity with the
# base: the mean win-rate of a control and its mirror (one draw alone: its own) within these bounds
PARITY = (0.45, 0.55)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def accuracy_rows(path: Path) -> dict[str, dict]:
    """metric -> its row of ``accuracy.json`` (accuracy with ties as half, CI)."""
    return {row["metric"]: row for row in json.loads(path.read_text())["metrics"]}


def model_rows(results: dict) -> dict[str, dict]:
    """Per fine-tuned model: judge win-rate (image unit) with CI, and the three means vs the base."""
    base = results["baseline"]
    means = {(m["model"], m["metric"]): m for m in results["means"]}
    rows = {}
    for name in results["models"]:
        if name == base:
            continue
        win = next(w for w in results["win_rates"] if w["model"] == name and w["metric"] == JUDGE and w["unit"] == "image")
        row = {"judge_win_rate": win["win_rate"], "judge_ci_low": win["ci_low"], "judge_ci_high": win["ci_high"], "judge_tie_rate": win["tie_rate"], "pairs": win["n"]}
        for metric in (JUDGE, REWARD, FIDELITY):
            row[f"{metric}_base"] = means[(base, metric)]["mean"]
            row[metric] = means[(name, metric)]["mean"]
        row["fidelity_change_points"] = 100 * (row[FIDELITY] - row[f"{FIDELITY}_base"])
        rows[name] = row
    return rows


def pool_selection(manifest: "pd.DataFrame", scores: "pd.DataFrame", pairs_cfg: "PairsConfig") -> dict:
    """What the reward picks from the pool, seen by the judge: the judge's mean over the pool, over
    the chosen and rejected images as the pair builder picks them (``pairs_cfg``'s selection, the
    paper's roles), and the share of those pairs whose chosen image the judge prefers. The share
    is what an offline fine-tune can learn of the taste from the reward: pairs the judge orders
    the other way pull against it."""
    from dataclasses import replace

    from ..pairs import best_and_worst

    cfg = replace(pairs_cfg, swap_chosen_rejected=False, random_roles=False)
    per_prompt, _ = best_and_worst(manifest, scores, cfg, check_files=False, sources=("pool manifest", "pool scores"))
    judge = scores.drop_duplicates("image_id").set_index("image_id")[JUDGE]
    chosen, rejected = judge.loc[per_prompt.chosen_image_id].to_numpy(), judge.loc[per_prompt.rejected_image_id].to_numpy()
    return {"prompts": int(per_prompt.prompt_id.nunique()), "pairs": len(chosen), "judge_pool": float(scores[JUDGE].mean()), "judge_chosen": float(chosen.mean()),
            "judge_rejected": float(rejected.mean()), "chosen_preferred": float((chosen > rejected).mean())}  # fmt: skip


def arms_versus(scores: "pd.DataFrame", reference: str, others: list[str]) -> dict[str, dict]:
    """Each of ``others`` against the arm ``reference`` on the judge, from the same seeds (image
    unit): separates what the reward's direction does from what fine-tuning on the set does."""
    from eval.stats import Bootstrap, win_table

    table = win_table(scores, reference, others, [JUDGE], Bootstrap())
    rows = table[table.unit == "image"]
    return {r.model: {"versus": reference, "judge_win_rate": r.win_rate, "ci_low": r.ci_low, "ci_high": r.ci_high, "tie_rate": r.tie_rate, "pairs": r.n} for r in rows.itertuples()}


def named_control(arm: str, controls: dict[str, str] | None) -> str:
    """The control ``controls`` (demo.controls) names for ``arm``, else the random-roles ``random``."""
    return (controls or {}).get(arm, CONTROL_ARM)


def mirror_of(control: str | None, mirrors: dict[str, str] | None) -> str | None:
    """The mirror ``mirrors`` (demo.mirrors) names for ``control``: its draw with the roles reversed."""
    return (mirrors or {}).get(control) if control else None


def control_arms(arms: list[str], controls: dict[str, str], mirrors: dict[str, str] | None = None) -> set[str]:
    """The arms that ran as another arm's control (``controls``, else the random-roles ``random``),
    and as a control's mirror (``mirrors``)."""
    used = {c for a in arms if (c := named_control(a, controls)) in arms and c != a}
    return used | {m for c in used if (m := mirror_of(c, mirrors)) in arms}


def control_of(arm: str, arms: list[str], controls: dict[str, str], mirrors: dict[str, str] | None = None) -> str | None:
    """The control ``arm`` is compared with for the reward's direction, when it ran (a control has none)."""
    control = named_control(arm, controls)
    return control if control in arms and control != arm and arm not in control_arms(arms, controls, mirrors) else None


def controls_of(arm: str, arms: list[str], controls: dict[str, str], mirrors: dict[str, str] | None = None) -> list[str]:
    """What ``arm`` is compared with for the reward's direction: its control and that control's mirror, those that ran."""
    control = control_of(arm, arms, controls, mirrors)
    return [c for c in (control, mirror_of(control, mirrors)) if c is not None and c in arms]


def comparisons(arms: list[str], controls: dict[str, str] | None = None, mirrors: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """(reference arm, arms compared with it): every arm but the controls against the first (the
    demo's method), and every arm against its control (and the control's mirror) when that ran."""
    controls = controls or {}
    used = control_arms(arms, controls, mirrors)
    pairs = {arms[0]: [a for a in arms[1:] if a not in used]}
    for arm in arms:
        for control in controls_of(arm, arms, controls, mirrors):
            if arm not in pairs.setdefault(control, []):
                pairs[control].append(arm)
    return [(reference, others) for reference, others in pairs.items() if others]


def checks(model: dict, accuracy: dict[str, dict]) -> list[tuple[str, bool]]:
    """(description, passed) for each target, for one fine-tuned model."""
    reward = accuracy[REWARD]["accuracy"]
    ceiling = f" (the taste itself: {_pct(accuracy[JUDGE]['accuracy'])})" if JUDGE in accuracy else ""  # a bar above it can't be met
    return [
        (f"judge win-rate {_pct(model['judge_win_rate'])} >= {_pct(TARGETS['judge_win_rate'])}", model["judge_win_rate"] >= TARGETS["judge_win_rate"]),
        (f"judge win-rate CI low {_pct(model['judge_ci_low'])} > {_pct(TARGETS['judge_ci_low'])}", model["judge_ci_low"] > TARGETS["judge_ci_low"]),
        (f"mean Social Reward {model[REWARD]:.3f} > base {model[REWARD + '_base']:.3f}", model[REWARD] > model[REWARD + "_base"]),
        (f"prompt fidelity {_pct(model[FIDELITY])} vs base {_pct(model[FIDELITY + '_base'])} (at most {TARGETS['fidelity_drop_points']:.0f} points below)", model["fidelity_change_points"] >= -TARGETS["fidelity_drop_points"]),
        (f"Social Reward pairwise accuracy {_pct(reward)} >= {_pct(TARGETS['reward_accuracy'])}{ceiling}", reward >= TARGETS["reward_accuracy"]),
        learned_check(accuracy),
    ]


def learned_check(accuracy: dict[str, dict]) -> tuple[str, bool]:
    """Has the reward learnt more than the untrained CLIP knew: its CI's lower bound above the CLIP's
    accuracy (the accuracy itself where no CI was measured)."""
    reward, untrained = accuracy[REWARD], accuracy[UNTRAINED]["accuracy"]
    low = reward.get("ci_low", reward["accuracy"])
    return f"Social Reward pairwise accuracy {_pct(reward['accuracy'])} (CI low {_pct(low)}) above the untrained CLIP's {_pct(untrained)}", low > untrained


RELATIVE_HINT = (
    "The reward has not shown that it learnt more than the untrained CLIP knew: its logs are small (`--quick` curates a third "
    "of them and trains 100 steps) or hold little preference within a prompt, as when the taste varies mostly between prompts; "
    "for the latter, `demo.community.appeal=relative` has each post judged against its prompt's other posts (README, \"Tastes\")."
)


def direction_checks(versus: dict[str, dict], controls: dict[str, str] | None = None, mirrors: dict[str, str] | None = None) -> list[tuple[str, bool]]:
    """(description, passed): each of the demo's methods (sft, dpo) beats its control (and the
    control's mirror) and the swapped ablation loses to it, each with the 95% CI clear of 50%;
    arms that did not run are left out."""
    rows = []
    for arm, should_win in DIRECTION.items():
        control = named_control(arm, controls)
        for other in (control, mirror_of(control, mirrors)):
            v = versus.get(f"{arm} vs {other}")
            if v is None:
                continue
            ci = f"{_pct(v['judge_win_rate'])}, CI {_pct(v['ci_low'])} – {_pct(v['ci_high'])}"
            if should_win:
                rows.append((f"{arm} beats {other} on the judge ({ci}; CI low > 50%)", v["ci_low"] > 0.5))
            else:
                rows.append((f"{arm} loses to {other} on the judge ({ci}; CI high < 50%)", v["ci_high"] < 0.5))
    return rows


def parity_checks(models: dict[str, dict], arms: list[str], controls: dict[str, str] | None = None, mirrors: dict[str, str] | None = None) -> list[tuple[str, bool]]:
    """(description, passed) per control that ran: fine-tuning on the pool without the reward's
    direction leaves the judge at parity with the base, the mean win-rate of the control and its
    mirror (a lone draw: its own) within ``PARITY``."""
    low, high = PARITY
    rows = []
    for ran in sorted({tuple(ran) for arm in arms if (ran := controls_of(arm, arms, controls or {}, mirrors))}):
        drawn = [c for c in ran if c in models]
        if not drawn:
            continue
        rates = [models[c]["judge_win_rate"] + models[c].get("judge_tie_rate", 0.0) / 2 for c in drawn]  # a tie is half a win
        mean = sum(rates) / len(rates)
        each = ", ".join(f"{c} {_pct(r)}" for c, r in zip(drawn, rates))
        what = f"mean of {each}" if len(drawn) > 1 else f"{each}, one draw"
        shifts = _judge_shifts(models, drawn, [arm for arm in arms if tuple(controls_of(arm, arms, controls or {}, mirrors)) == ran])
        rows.append((f"without the reward's direction the judge stays at parity: {_pct(mean)} against the base ({what}, ties as half; within {_pct(low)} – {_pct(high)}){shifts}", low <= mean <= high))
    return rows


def _judge_shifts(models: dict[str, dict], drawn: list[str], arms: list[str]) -> str:
    """How far the controls' mean judge moved from the base's, beside the arms' own move: a
    same-seed win-rate turns any consistent change into a win or a loss, however small."""
    def shift(name: str) -> float | None:
        row = models.get(name, {})
        return row[JUDGE] - row[f"{JUDGE}_base"] if JUDGE in row and f"{JUDGE}_base" in row else None

    control = [shift(c) for c in drawn]
    if any(v is None for v in control):
        return ""
    parts = [f"judge mean {sum(control) / len(control):+.4f} against the base"]
    parts += [f"{arm}'s {v:+.4f}" for arm in arms if (v := shift(arm)) is not None]
    return f"; {', '.join(parts)}"


def stages_of_run(done: dict[str, dict], arms: list[str]) -> dict[str, dict]:
    """The finished stages this run used: the world, the shared stages and its arms' (a folder
    also keeps the stages of arms that an earlier run fine-tuned)."""
    return {key: stage for key, stage in done.items() if key.startswith("world:") or ":" not in key or key.split(":", 1)[1] in arms}


def timing_markdown(stages: dict[str, dict]) -> list[str]:
    """Seconds per stage as they ran (a stage finished in an earlier run keeps its first time)."""
    seconds: dict[str, float] = {}
    for key, stage in stages.items():  # the world's parts (world:community, ...) as one entry
        name = "world" if key.startswith("world:") else key
        seconds[name] = seconds.get(name, 0.0) + stage["seconds"]
    total = sum(seconds.values())
    return ["## Time per stage", "", " · ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f" · **total {total / 60:.1f} min**", ""]


def _checklist(items: list[tuple[str, bool]]) -> list[str]:
    return [f"- [{'x' if ok else ' '}] {text}" for text, ok in items] + [""]


def summary_markdown(
    accuracy: dict[str, dict], models: dict[str, dict], report: str, arms: list[str], stages: dict[str, dict] | None = None,
    pool: dict | None = None, versus: dict | None = None, controls: dict[str, str] | None = None, mirrors: dict[str, str] | None = None,
    appeal: str | None = None,
) -> str:
    """The summary's markdown; with ``appeal`` (the community's), a reward that learnt nothing under the
    absolute appeal is followed by the hint to try the relative one."""
    lines = ["# Demo world: results", "", f"Report with image grids: {report}", "", "## Social Reward model: pairwise accuracy on held-out triplets", "",
             "| scorer | accuracy (tie = ½) | 95% CI |", "| --- | ---: | --- |"]  # fmt: skip
    labels = {REWARD: "Social Reward (trained)", UNTRAINED: "untrained world CLIP", JUDGE: "the hidden taste (judge; a ceiling)"}
    for metric, row in accuracy.items():
        lines.append(f"| {labels.get(metric, metric)} | {_pct(row['accuracy'])} | {_pct(row['ci_low'])} – {_pct(row['ci_high'])} |")
    if pool:
        whose = f" (`{pool['arm']}`'s selection)" if pool.get("arm") else ""
        lines += ["", f"In the pool ({pool['prompts']} prompts), the judge prefers the reward's chosen image to its rejected one in "
                  f"{_pct(pool['chosen_preferred'])} of {pool['pairs']} pairs{whose} (judge mean: chosen {pool['judge_chosen']:.3f}, rejected {pool['judge_rejected']:.3f}, "
                  f"pool {pool['judge_pool']:.3f}). Pairs the judge orders the other way pull the fine-tune against the taste."]  # fmt: skip
    lines += ["", "## Fine-tuned vs base on held-out prompts (same seeds)", "",
              "| model | judge win-rate | 95% CI | judge mean (base) | Social Reward (base) | fidelity (base) |", "| --- | ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in models.items():
        lines.append(
            f"| {name} | {_pct(r['judge_win_rate'])} | {_pct(r['judge_ci_low'])} – {_pct(r['judge_ci_high'])} | {r[JUDGE]:.3f} ({r[JUDGE + '_base']:.3f}) "
            f"| {r[REWARD]:.3f} ({r[REWARD + '_base']:.3f}) | {_pct(r[FIDELITY])} ({_pct(r[FIDELITY + '_base'])}) |"
        )
    lines.append("")
    if any(name.endswith("-no-neg") for name in models):
        lines += ["`<arm>-no-neg`: the same model sampled without the negative token as negative prompt.", ""]
    for name, v in (versus or {}).items():
        lines.append(f"- {name} (same seeds, judge): win-rate {_pct(v['judge_win_rate'])} ({_pct(v['ci_low'])} – {_pct(v['ci_high'])}), {v['pairs']} image pairs")
    used = sorted(control_arms(arms, controls or {}, mirrors))
    if used:
        lines.append(f"- {', '.join(f'`{c}`' for c in used)}: the same fine-tune with two images of each prompt drawn at random in the roles "
                     "(a mirror: the same draw with the roles reversed): what fine-tuning on the pool does without the reward's direction")
    if versus or used:
        lines.append("")
    for arm in arms[:1]:  # the targets are the demo's method's (the first arm); the other arms are compared with it above
        if arm in models:
            lines += [f"## Targets ({arm})", ""] + _checklist(checks(models[arm], accuracy))
    if appeal == "absolute" and REWARD in accuracy and UNTRAINED in accuracy and not learned_check(accuracy)[1]:
        lines += [RELATIVE_HINT, ""]
    direction = direction_checks(versus or {}, controls, mirrors) + parity_checks(models, arms, controls, mirrors)
    if direction:
        lines += ["## The reward's direction (against the control)", ""] + _checklist(direction)
    if stages:
        lines += timing_markdown(stages)
    return "\n".join(lines)


def write_summary(demo) -> Path:
    """``summary.md`` and ``demo.json`` in the demo's folder, from its stages' results."""
    import pandas as pd

    out, evaluation = demo.out, demo.output_dir("evaluate")
    accuracy = accuracy_rows(demo.output_dir("accuracy") / "accuracy.json")
    results = json.loads((evaluation / "results.json").read_text())
    models = model_rows(results)
    arms, controls, mirrors = list(demo.cfg.arms), dict(demo.cfg.controls), dict(demo.cfg.mirrors)
    stages = stages_of_run(demo.state.done, arms)
    method = arms[0] if arms and not demo.is_online(arms[0]) else None  # the pairs the demo's method trains on
    pool, pairs_cfg = None, demo.section_config("pairs", demo.arm_overrides(method) if method else ())
    pool_scores = demo.output_dir("score") / "scores.parquet"
    scores = pd.read_parquet(pool_scores) if pool_scores.is_file() else None
    if scores is not None and JUDGE in scores and pairs_cfg.reward_column in scores:
        from ..pairs import read_generations

        pool = pool_selection(read_generations(pairs_cfg.generations), scores, pairs_cfg) | {"arm": method}
    versus = {}
    if len(arms) > 1:
        eval_scores = pd.read_parquet(evaluation / "scores.parquet")
        for reference, others in comparisons(arms, controls, mirrors):
            versus.update({f"{name} vs {reference}": row for name, row in arms_versus(eval_scores, reference, others).items()})
    ran_controls = {arm: control for arm in arms if (control := control_of(arm, arms, controls, mirrors))}
    ran_mirrors = {c: m for c, m in mirrors.items() if c in arms and m in arms}
    data = {"versus": versus, "controls": ran_controls, "mirrors": ran_mirrors, "accuracy": accuracy, "models": models, "targets": TARGETS,
            "checks": {arms[0]: dict(checks(models[arms[0]], accuracy)), "direction": dict(direction_checks(versus, controls, mirrors)),
                       "parity": dict(parity_checks(models, arms, controls, mirrors))}, "stages": stages, "pool": pool}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(data, indent=2))
    path = out / "summary.md"
    path.write_text(summary_markdown(accuracy, models, str(evaluation / "report.html"), arms, stages, pool, versus, controls, mirrors, demo.cfg.community.appeal))
    return path


def taste_rows(taste: str, data: dict) -> list[dict]:
    """One row per arm of one taste's ``demo.json``: against the base and the control, the means."""
    rows = []
    for arm, m in data["models"].items():
        named = named_control(arm, data.get("controls"))
        control = data["versus"].get(f"{arm} vs {named}", {})
        mirror = data["versus"].get(f"{arm} vs {mirror_of(named, data.get('mirrors'))}", {})
        rows.append({"taste": taste, "arm": arm, "judge_win_rate": m["judge_win_rate"], "judge_ci_low": m["judge_ci_low"], "judge_ci_high": m["judge_ci_high"],
                     "vs_control": control.get("judge_win_rate"), "vs_control_ci_low": control.get("ci_low"), "vs_control_ci_high": control.get("ci_high"),
                     "vs_mirror": mirror.get("judge_win_rate"), "vs_mirror_ci_low": mirror.get("ci_low"), "vs_mirror_ci_high": mirror.get("ci_high"),
                     JUDGE: m[JUDGE], JUDGE + "_base": m[JUDGE + "_base"], REWARD: m[REWARD], REWARD + "_base": m[REWARD + "_base"],
                     FIDELITY: m[FIDELITY], FIDELITY + "_base": m[FIDELITY + "_base"]})  # fmt: skip
    return rows


def tastes_markdown(rows: list[dict], taste_checks: dict[str, list[tuple[str, bool]]], accuracy: dict[str, float], pools: dict[str, dict] | None = None) -> str:
    """The comparison over tastes: a row per taste and arm, then each taste's checks."""
    def ci(low: float | None, high: float | None) -> str:
        return "" if low is None else f" ({_pct(low)} – {_pct(high)})"

    lines = ["# Demo world over tastes", "", "Judge win-rates are same-seed image pairs on held-out prompts (95% bootstrap CIs over prompts); "
             "`vs control` compares with the arm's random-roles control (the same fine-tune on the pool without the reward's direction), "
             "`vs mirror` with that draw's mirror (its roles reversed).", "",
             "| taste | arm | vs base | vs control | vs mirror | judge mean (base) | Social Reward (base) | fidelity (base) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        control = "" if r["vs_control"] is None else _pct(r["vs_control"]) + ci(r["vs_control_ci_low"], r["vs_control_ci_high"])
        mirror = "" if r.get("vs_mirror") is None else _pct(r["vs_mirror"]) + ci(r["vs_mirror_ci_low"], r["vs_mirror_ci_high"])
        lines.append(f"| {r['taste']} | {r['arm']} | {_pct(r['judge_win_rate'])}{ci(r['judge_ci_low'], r['judge_ci_high'])} | {control} | {mirror} "
                     f"| {r[JUDGE]:.3f} ({r[JUDGE + '_base']:.3f}) | {r[REWARD]:.3f} ({r[REWARD + '_base']:.3f}) | {_pct(r[FIDELITY])} ({_pct(r[FIDELITY + '_base'])}) |")  # fmt: skip
    lines += ["", "Social Reward pairwise accuracy on held-out triplets: " + ", ".join(f"{t} {_pct(a)}" for t, a in accuracy.items()), ""]
    if pools:
        lines += ["Pairs of the pool whose chosen image the judge prefers: " + ", ".join(f"{t} {_pct(p['chosen_preferred'])} of {p['pairs']}" for t, p in pools.items()), ""]
    for taste, items in taste_checks.items():
        met = sum(ok for _, ok in items)
        lines += [f"## {taste}: {met} of {len(items)} checks met", ""] + _checklist(items)
    return "\n".join(lines)


def write_tastes_summary(root: Path, runs: dict[str, Path], arms: list[str]) -> Path:
    """``tastes.md`` and ``tastes.json`` in ``root`` from each taste's ``demo.json``."""
    rows, taste_checks, accuracy, pools = [], {}, {}, {}
    for taste, out in runs.items():
        data = json.loads((out / "demo.json").read_text())
        rows += taste_rows(taste, data)
        if data.get("pool") and "pairs" in data["pool"]:
            pools[taste] = data["pool"]
        taste_checks[taste] = [*data["checks"][arms[0]].items(), *data["checks"]["direction"].items(), *data["checks"].get("parity", {}).items()]
        accuracy[taste] = data["accuracy"][REWARD]["accuracy"]
    checks_json = {taste: dict(items) for taste, items in taste_checks.items()}
    (root / "tastes.json").write_text(json.dumps({"rows": rows, "checks": checks_json, "reward_accuracy": accuracy, "pools": pools, "runs": {t: str(p) for t, p in runs.items()}}, indent=2))
    path = root / "tastes.md"
    path.write_text(tastes_markdown(rows, taste_checks, accuracy, pools))
    return path


__all__ = ["CONTROL_ARM", "PARITY", "TARGETS", "accuracy_rows", "arms_versus", "checks", "comparisons", "control_arms", "control_of", "controls_of", "mirror_of", "named_control", "direction_checks", "learned_check", "parity_checks", "model_rows", "pool_selection", "stages_of_run", "summary_markdown", "taste_rows", "tastes_markdown", "write_summary", "write_tastes_summary"]
