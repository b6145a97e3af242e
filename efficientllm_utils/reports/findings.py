"""The paper's claims (``book/paper/claims.csv``) decided on a chapter's records: one finding per claim and
model, with its sentence and verdict, and the caveats the records show."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..metrics.schema import PAPER_METRICS
from .display import format_params
from .load import StudyResults
from .paper import claims, paper_quote
from .verdicts import AGREES, DISAGREES, INCONCLUSIVE, Difference, combine, decide, diff_margin, either, is_estimate


@dataclass
class Finding:
    """One claim of the paper tested on one model: the sentence shown, generated from the numbers, and its
    verdict."""

    claim_id: str
    model: str
    verdict: str
    sentence: str
    figure: str = ""  # the numbers the verdict rests on, in short (the study-at-a-glance table shows it)

    @property
    def anchor(self) -> str:
        """The finding's id on its chapter page (the claim, then the model where a chapter tests several)."""
        return anchor_id(self.claim_id, self.model)

    def markdown(self) -> str:
        return f'- <span id="{self.anchor}"></span>**{self.verdict}**: {self.sentence}'


def anchor_id(claim_id: str, model: str = "") -> str:
    """``("a-mqa-latency", "hidden 128, 2 layers")`` -> ``a-mqa-latency--hidden-128-2-layers``."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"{claim_id}--{slug}" if slug else claim_id


def findings_markdown(findings: list[Finding], observations: list[str] | None = None,
                      caveats: list[str] | None = None) -> str:
    """Findings grouped by model, then observations (numbers without a claim) and caveats the records show."""
    if not findings and not observations:
        return "*The runs needed for the paper's claims are not in these results.*"
    lines = []
    models = list(dict.fromkeys(f.model for f in findings))
    for model in models:
        if len(models) > 1 or model:
            lines.append(f"\n**{model}**\n")
        lines += [f.markdown() for f in findings if f.model == model]
    if observations:
        lines.append("\n**Other observations**\n")
        lines += [f"- {o}" for o in observations]
    if caveats:
        lines.append("\n**Caveats these records show**\n")
        lines += [f"- {c}" for c in caveats]
    return "\n".join(lines)


def verdict_counts(findings) -> str:
    """``2 agree, 1 disagrees, 3 inconclusive`` over the findings (or their verdicts)."""
    verdicts = [getattr(f, "verdict", f) for f in findings]
    counts = {v: verdicts.count(v) for v in (AGREES, DISAGREES, INCONCLUSIVE)}
    words = {AGREES: ("agrees", "agree"), DISAGREES: ("disagrees", "disagree"), INCONCLUSIVE: ("inconclusive",) * 2}
    return ", ".join(f"{n} {words[v][0] if n == 1 else words[v][1]}" for v, n in counts.items())


def opening_summary(ran: str, found, table, per_model) -> str:
    """A chapter's opening lines: what this run did (``ran``) and the paper's claims' verdicts, then one bullet per
    model, ``per_model(model, its rows)`` saying what it found."""
    lines = [f"This run {ran}. The paper's claims: {verdict_counts(found)}."]
    lines += [f"- **{model}**{per_model(model, group)}" for model, group in table.groupby("model", sort=False)]
    return "\n".join(lines)


# --- caveats from the records ---------------------------------------------------------------------

def common_caveats(res: StudyResults, n_params: dict[str, float | None], smallest_paper_params: float,
                   min_items: int | None = None, items: int | None = None) -> list[str]:
    """Caveats that every study's records can show: CPU only, a model far smaller than the paper's, estimated
    energy, too few scored items."""
    df = res.ok
    out = []
    if len(df) and "param_device" in df and (df["param_device"] == "cpu").all():
        out.append("Every run ran on a CPU: latency, memory and energy are CPU figures, PCU needs a GPU, and the "
                   "paper's GPU kernels (and their bf16/int4 speed-ups) are not what ran here.")
    small = {m: n for m, n in n_params.items() if n and n < smallest_paper_params}
    if small:
        out.append("Model sizes below the paper's smallest (" + format_params(smallest_paper_params) + "): "
                   + ", ".join(f"{m} {format_params(n)}" for m, n in small.items())
                   + "; effects that grow with scale may not show.")
    energy_methods = [col for col in df.columns if col.endswith("_method") and col.startswith(("aec_w", "energy"))]
    estimated = sorted({m.split("/")[0] for col in energy_methods for m in df[col].dropna() if is_estimate(m)})
    if estimated:
        out.append(f"Energy is estimated ({', '.join(estimated)}), not measured by a counter: it follows how much "
                   "CPU a run got, so no energy claim is decided on it.")
    if min_items is not None and items is not None and items < min_items:
        out.append(f"Accuracy rests on {items} scored items per run: only differences of several items can be "
                   "told from chance.")
    return out


def _first_present(names: str, present: set[str]) -> str | None:
    """``"moe-8x2|moe-1.5Bx8"`` -> the first name a model's runs have."""
    return next((n for n in names.split("|") if n in present), None) if names else None


def variants_by_model(runs: dict[tuple[str, str], object]) -> dict[str, list[str]]:
    """The ``(model, variant)`` keys of a report's runs grouped: model -> its variants, in the runs' order."""
    variants: dict[str, list[str]] = {}
    for model, variant in runs:
        variants.setdefault(model, []).append(variant)
    return variants


def decide_claims(chapter: str, axis: str, variants: dict[str, list[str]], compare, words: dict[str, str],
                expected=None, resolve=None, margin=None) -> list[Finding]:
    """Every claim of ``chapter`` in ``claims.csv``, on every model of ``variants`` (model -> its variants) that
    has the runs the claim names.

    ``compare(claim, model, subject, baseline)`` returns the ``Difference`` of two runs on the claim's metric (by
    the rule that suits the metric) or None when the records lack what the rule needs; ``words`` names each metric
    in a sentence; ``expected(claim, model)`` gives the direction of a claim whose direction is ``ranks`` (read from
    the paper's leaderboard of the model's size group) and a phrase saying so; ``resolve(model, name)`` maps a
    name of a claim's subject, baseline or ``among`` such as ``reference`` to a run's name (or ``|``-joined names); ``margin(claim)`` is a ``not_lower`` claim's allowed drop. A claim
    whose direction is ``front`` (a best quality-cost trade-off) is decided by ``_front_finding``.
    """
    out = []
    for model, names in variants.items():
        present = set(names)
        for _, claim in claims(chapter).iterrows():
            if resolve is not None:
                claim = claim.copy()
                for key in ("subject", "baseline", "among"):
                    claim[key] = "|".join(resolve(model, n) for n in claim[key].split("|")) if claim[key] else ""
            if claim["direction"] in ("front", "none_best"):
                rule = _front_finding if claim["direction"] == "front" else _none_best_finding
                finding = rule(claim, model, present, compare, words, axis)
                out += [finding] if finding is not None else []
                continue
            subject = _first_present(claim["subject"], present)
            if subject is None:
                continue
            direction, source = claim["direction"], ""
            if direction in ("lowest", "highest"):
                others = [n for n in claim["among"].split("|") if n in present and n != subject]
                parts = [(o, "lower" if direction == "lowest" else "higher") for o in others]
            else:
                baseline = _first_present(claim["baseline"], present)
                if baseline is None or baseline == subject:
                    continue
                if direction == "ranks":
                    direction, source = expected(claim, model)
                    if direction is None:
                        continue
                parts = [(baseline, direction)]
            if not parts:
                continue
            head = claim_head(claim, axis, source)
            pieces, verdicts, estimated, missing = [], [], False, []
            for other, expect in parts:
                diff = compare(claim, model, subject, other)
                if diff is None:
                    missing.append(other)
                    verdicts.append(INCONCLUSIVE)
                    continue
                estimated |= diff.estimated
                allowed = margin(claim) if expect == "not_lower" else diff_margin(diff)
                verdicts.append(decide(diff, expect, allowed))
                pieces.append(f"against {other} {diff}")
                if expect == "not_lower":
                    pieces[-1] += f" (the claim allows a drop of at most {100 * allowed:.1f}%)"
            sentence = f"{head} Here {words.get(claim['metric'], claim['metric'])} of {subject}: " \
                       + ("; ".join(pieces) or "no comparison possible") + "."
            if missing:
                sentence += f" The records lack the values the rule needs for {', '.join(missing)}."
            if estimated:
                sentence += (" At least one of these values is estimated (no energy counter), not measured: a "
                             "difference involving an estimate is no evidence either way.")
            figure = f"{claim['metric']} of {subject}: " + ("; ".join(pieces) or "no comparison possible")
            out.append(Finding(claim["claim_id"], model, combine(verdicts), sentence, figure))
    return out


def claim_head(claim, axis: str, source: str = "") -> str:
    """A finding's opening: the claim in italics, then the paper's figures it quotes, each labelled with where
    they were taken from (``published_figures.csv``'s source and confidence: a summary of the paper, second-hand),
    else the claim's source."""
    paper = paper_quote(claim["paper_figures"], axis)
    if paper or source:
        return f"*{claim['statement']}* ({paper}{'; ' if paper and source else ''}{source})."
    return f"*{claim['statement']}* ({claim['source']})."


def _front_finding(claim, model: str, present: set[str], compare, words: dict[str, str], axis: str
                   ) -> Finding | None:
    """A ``front`` claim: each subject (``a+b``: every one) offers a best quality-cost trade-off. Its ``metric`` is
    ``quality+cost+cost...``, all lower-is-better. For each subject (1) every cost is lower than the baseline's
    (``lower``), and (2) no other method of ``among`` beats it on the quality and every cost at once: against each
    other method the subject must be lower on at least one metric (``either``; disagrees when the other is lower on
    all of them). Agrees when every part agrees (``combine``). None when a subject or the baseline lacks its run."""
    subjects, metrics = claim["subject"].split("+"), claim["metric"].split("+")
    baseline = _first_present(claim["baseline"], present)
    if baseline is None or not all(s in present for s in subjects):
        return None

    def difference(metric, subject, other):
        diff = compare({**claim, "metric": metric}, model, subject, other)
        verdict = INCONCLUSIVE if diff is None else decide(diff, "lower", diff_margin(diff))
        return diff, verdict

    verdicts, texts = [], []
    for subject in subjects:
        cost_parts = []
        for metric in metrics[1:]:
            diff, verdict = difference(metric, subject, baseline)
            verdicts.append(verdict)
            cost_parts.append(f"{words.get(metric, metric)} {diff if diff is not None else 'not in the records'}")
        beaten, undecided = [], []
        for other in [n for n in claim["among"].split("|") if n in present and n not in (subject,)]:
            parts = [difference(metric, subject, other) for metric in metrics]
            verdict = either([v for _, v in parts])
            verdicts.append(verdict)
            if verdict == DISAGREES:
                beaten.append(other + " (" + ", ".join(f"{m} {d}" for m, (d, _) in zip(metrics, parts)) + ")")
            elif verdict == INCONCLUSIVE:
                undecided.append(other)
        front = ("lower on at least one of " + ", ".join(metrics) + " than every other method"
                 if not beaten and not undecided else
                 (f"beaten on all of {', '.join(metrics)} by {'; '.join(beaten)}" if beaten else "")
                 + ("; " if beaten and undecided else "")
                 + (f"not told apart on any of them from {', '.join(undecided)}" if undecided else ""))
        texts.append(f"{subject} against {baseline}: " + "; ".join(cost_parts) + f"; on the front: {front}")
    return Finding(claim["claim_id"], model, combine(verdicts),
                   f"{claim_head(claim, axis)} Here " + ". ".join(texts) + ".", "; ".join(texts))


# the metrics of ``claims.csv`` where higher is better (every other one is lower-is-better): the paper's efficiency
# metrics so declared, by name (``TT``) or record column (``it_tokens_per_s``), and the quality scores
HIGHER_IS_BETTER_METRICS = ({"accuracy", "psnr_db", "ssim"}
                            | {key for m in PAPER_METRICS.values() if not m.lower_is_better for key in (m.name, m.column)})


def _none_best_finding(claim, model: str, present: set[str], compare, words: dict[str, str], axis: str
                       ) -> Finding | None:
    """A ``none_best`` claim: no method of ``among`` is best on every metric of ``metric`` (``a+b+...``; better is
    lower except ``HIGHER_IS_BETTER_METRICS``). A method is beaten when some other method is better than it on some
    metric beyond the noise (that comparison, by the metric's rule, agrees); it is best on everything when it is
    better than every other method on every metric. Agrees when every method is beaten, disagrees when one method is
    best on everything, else inconclusive. None with fewer than two methods."""
    methods = [n for n in claim["among"].split("|") if n in present]
    metrics = claim["metric"].split("+")
    if len(methods) < 2:
        return None

    def better(metric, subject, other) -> tuple[str, Difference | None]:
        diff = compare({**claim, "metric": metric}, model, subject, other)
        expect = "higher" if metric in HIGHER_IS_BETTER_METRICS else "lower"
        return (INCONCLUSIVE if diff is None else decide(diff, expect, diff_margin(diff))), diff

    beaten, best, undecided = {}, [], []
    for subject in methods:
        for other in methods:
            if other == subject or subject in beaten:
                continue
            for metric in metrics:
                verdict, diff = better(metric, other, subject)
                if verdict == AGREES:
                    beaten[subject] = f"{subject} by {other} on {metric} ({other} {diff})"
                    break
        if subject in beaten:
            continue
        if all(better(metric, subject, other)[0] == AGREES for other in methods if other != subject
               for metric in metrics):
            best.append(subject)
        else:
            undecided.append(subject)
    verdict = DISAGREES if best else AGREES if len(beaten) == len(methods) else INCONCLUSIVE
    parts = [f"beaten: {'; '.join(beaten.values())}" if beaten else "",
             f"best on every metric: {', '.join(best)}" if best else "",
             f"neither beaten nor best beyond the noise: {', '.join(undecided)}" if undecided else ""]
    figure = ". ".join(p for p in parts if p)
    sentence = (f"{claim_head(claim, axis)} Here, on {', '.join(words.get(m, m) for m in metrics)} "
                f"among {', '.join(methods)}: {figure}.")
    return Finding(claim["claim_id"], model, verdict, sentence, figure)
