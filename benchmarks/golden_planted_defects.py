"""Plant defects in the plugins' source, one at a time, and record which golden tests fail (issue 25, item 4).

Each defect is a one-line edit of a plugin file: a tensor passed detached where the official code
passes gradients, a normalisation skipped or done over the wrong axis, an EMA at the wrong time, the
HaDis noise as clusterkit drew it before the whole-step golden.  For each, the golden tests run
(``tests/plugins/test_golden.py``, the function-level goldens, and
``tests/plugins/test_golden_steps.py``, the whole official training steps through the hooks, without
its own monkeypatched planted-defect tests) and the failures are written to
``benchmarks/results/golden_planted_defects.md``: the command, which tests failed and the first line
of each assertion message.  The edited file is restored to its exact previous text after every run
(also on an error or Ctrl-C), so uncommitted work in it is kept.

Usage (from the repository root; about 4 minutes on one core)::

    python benchmarks/golden_planted_defects.py [--out benchmarks/results/golden_planted_defects.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/plugins/test_golden.py", "tests/plugins/test_golden_steps.py"]
SELECT = "not planted_defect"

#: (method, defect, file, original text, planted text): each original occurs exactly once in its file.
DEFECTS = [
    ("ProPos", "PSL on a detached q (official: gradient into q)", "plugins/propos/prototype_aggregation.py",
     'losses = [prototype_aggregation_loss(cache.gather("q", a), cache.gather("k", b), labels,',
     'losses = [prototype_aggregation_loss(cache.gather("q", a).detach(), cache.gather("k", b), labels,'),
    ("ProPos", "PSL prototypes of the raw q (F.normalize skipped)", "plugins/propos/prototype_aggregation.py",
     "nu_a, in_batch = batch_prototypes(F.normalize(q_a, dim=1), labels, num_clusters)",
     "nu_a, in_batch = batch_prototypes(q_a, labels, num_clusters)"),
    ("ProPos", "PSA predictor on a detached diffused q", "plugins/propos/diffused_sampling.py",
     'losses = [diffused_sampling_loss(predictor(self.diffused(state, cache, a)), cache["k", b])',
     'losses = [diffused_sampling_loss(predictor(self.diffused(state, cache, a).detach()), cache["k", b])'),
    ("ProPos", "EMA from the post-step weights (the two EMA hooks swapped)", "plugins/propos/byol_target.py",
     '''        if self.params.ema_timing == "before_step":
            self.update_target(state, state.step + 1)  # the step about to be taken

    @hookimpl
    def after_step(self, state):
        if self.params.ema_timing == "after_step":''',
     '''        if self.params.ema_timing == "after_step":
            self.update_target(state, state.step + 1)  # the step about to be taken

    @hookimpl
    def after_step(self, state):
        if self.params.ema_timing == "before_step":'''),
    ("DigPro", "G' from a detached q (official: gradient through G' into q)", "plugins/digpro/momentum_grouping.py",
     "new_groups = momentum_update(groups, q_a, members, beta)",
     "new_groups = momentum_update(groups, q_a.detach(), members, beta)"),
    ("DigPro", "group logits of the raw p(q) (F.normalize skipped)", "plugins/digpro/momentum_grouping.py",
     "return F.normalize(pred, dim=1) @ F.normalize(groups, dim=1).t() / temperature",
     "return pred @ F.normalize(groups, dim=1).t() / temperature"),
    ("DigPro", "no extra EMA (extra_ema ignored)", "plugins/digpro/momentum_grouping.py",
     "if p.extra_ema and not regroups:", "if False:"),
    ("HaDis", "HSD student detached", "plugins/hadis/hardness_aware_distillation.py",
     "return state.model[PREDICTOR](q)", "return state.model[PREDICTOR](q).detach()"),
    ("HaDis", "HSD student of the raw p(q + noise) (F.normalize skipped)",
     "plugins/hadis/hardness_aware_distillation.py",
     "s = F.normalize(student.to(dtype), dim=1)", "s = student.to(dtype)"),
    ("HaDis", "HSD noise drawn apart from PSA's (the plugin before the whole-step golden)",
     "plugins/hadis/hardness_aware_distillation.py",
     'salt = NOISE_SALT if self.params.noise == "shared" else LOSS_NAME', "salt = LOSS_NAME"),
    ("CC", "instance head on a detached h", "plugins/cc/heads.py",
     'return instance_projection(model[INSTANCE_HEAD], cache["h", v])',
     'return instance_projection(model[INSTANCE_HEAD], cache["h", v].detach())'),
    ("CC", "z without F.normalize in the head (harmless: the loss normalises the rows again)", "plugins/cc/heads.py",
     "return F.normalize(head(h), dim=1)", "return head(h)"),
    ("CC", "cluster probabilities normalised over the batch (softmax dim 0)", "plugins/cc/heads.py",
     "return torch.softmax(head(h).float(), dim=1)", "return torch.softmax(head(h).float(), dim=0)"),
    ("PICI", "PISD decoder on detached encoder tokens", "plugins/pici/self_discrimination.py",
     "pred = decoder(enc.tokens, enc.ids_restore, enc.num_prefix)",
     "pred = decoder(enc.tokens.detach(), enc.ids_restore, enc.num_prefix)"),
    ("PICI", "PISD target patches not normalised (norm_pix skipped)", "plugins/pici/self_discrimination.py",
     "target = (target - mean) / (var + eps).sqrt()", "target = target - mean"),
]


def pytest_command(junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", SELECT,
            f"--junitxml={junit}"]


def failures(junit: Path) -> tuple[list[tuple[str, str]], int]:
    """[(test id, first line of its message)] of the failed tests, and the number of tests run."""
    root = ET.parse(junit).getroot()
    failed, total = [], 0
    for case in root.iter("testcase"):
        total += 1
        for bad in [*case.findall("failure"), *case.findall("error")]:
            lines = (bad.get("message") or "").strip().splitlines()
            test = f"{Path(case.get('classname', '').replace('.', '/')).name}::{case.get('name')}"
            failed.append((test, lines[0] if lines else ""))
    return failed, total


def run_one(defect: tuple, junit: Path) -> tuple[list[tuple[str, str]], int]:
    _, _, path, original, planted = defect
    file = REPO / path
    text = file.read_text()
    if text.count(original) != 1:
        raise SystemExit(f"{path}: the text to edit occurs {text.count(original)} times (expected once): "
                         f"{original!r}; update DEFECTS")
    try:
        file.write_text(text.replace(original, planted))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(pytest_command(junit), cwd=REPO, env=env, capture_output=True, text=True)
    finally:
        file.write_text(text)
    return failures(junit)


def report(rows: list, baseline: tuple) -> str:
    cmd = " ".join(["python", "-m", "pytest", "-q", *TESTS, "-k", f'"{SELECT}"'])
    lines = ["# Golden tests against planted defects (issue 25, item 4)", "",
             "Each defect below is a one-line edit of a plugin file, made, tested and reverted by",
             "`python benchmarks/golden_planted_defects.py`; the tests run for each are", "",
             f"    {cmd}", "",
             "(`test_golden.py`: the function-level goldens; `test_golden_steps.py`: whole official training",
             "steps through the trainer's hooks, without its own monkeypatched planted-defect tests, which check",
             "the same kind of defects on every run of the suite).",
             f"Without a defect: {baseline[1]} tests, {len(baseline[0])} failed.", "",
             "| method | planted defect | whole-step goldens failing | function-level goldens failing |",
             "|---|---|---|---|"]
    for method, name, _, _, _, failed, _ in rows:
        steps = sum(test.startswith("test_golden_steps::") for test, _ in failed)
        functions = sum(test.startswith("test_golden::") for test, _ in failed)
        lines.append(f"| {method} | {name} | {steps} | {functions} |")
    lines.append("")
    for method, name, path, original, planted, failed, total in rows:
        lines += [f"## {method}: {name}", "", f"`{path}`: `{original.strip().splitlines()[0].strip()}` -> "
                  f"`{planted.strip().splitlines()[0].strip()}`" + (" (and the matching line of `after_step`)"
                                                                    if "\n" in original else ""), ""]
        if not failed:
            lines += [f"No test fails ({total} passed).", ""]
            continue
        verb = "fails" if len(failed) == 1 else "fail"
        lines += [f"{len(failed)} of {total} tests {verb}:", "", "| test | first line of the assertion message |",
                  "|---|---|"]
        for test, message in failed:
            lines.append(f"| `{test}` | {message.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/golden_planted_defects.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(pytest_command(junit), cwd=REPO, env=env, capture_output=True, text=True)
        baseline = failures(junit)
        if baseline[0]:
            raise SystemExit(f"the golden tests fail without a planted defect: {baseline[0]}")
        rows = []
        for defect in DEFECTS:
            failed, total = run_one(defect, junit)
            rows.append((*defect, failed, total))
            print(f"{defect[0]}: {defect[1]}: {len(failed)} of {total} failed", flush=True)
    args.out.write_text(report(rows, baseline) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
