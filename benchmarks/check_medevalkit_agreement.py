"""Agreement check: medevalkit_metrics.py against MedEvalKit's own scoring code, run side by side on the same cases.

Imports the harness's ``utils/utils.py``, the VQA_RAD / SLAKE / PATH_VQA ``cal_metrics`` and MMMU's
``eval_utils.py`` from a local clone (nothing is copied; its cloud-client imports are stubbed, no network is used),
builds prediction/answer cases from the shipped VQA-RAD dev questions crossed with answer styles (exact, capitalised,
sentences, "answer:" phrases, \\boxed{}, <answer> tags, substrings such as "normal"/"eyes", wrong answers), and
compares every per-question verdict and every aggregate number. Prints the counts; exits 1 on any disagreement::

    git clone https://github.com/alibaba-damo-academy/MedEvalKit && git -C MedEvalKit checkout 9b12e3b
    python benchmarks/check_medevalkit_agreement.py --medevalkit_dir MedEvalKit

Needs the rouge/nltk pins of requirements.txt and sympy (installed with torch); mathruler is imported from
``--mathruler_dir`` when given (an unpacked mathruler 0.1.0 wheel), else the harness's boxed extraction is stubbed
with ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import medevalkit_metrics as mek  # noqa: E402


@dataclass
class Arguments:
    medevalkit_dir: str = field(metadata={"help": "A MedEvalKit clone (commit 9b12e3b)."})
    mathruler_dir: str | None = field(default=None, metadata={"help": "Unpacked mathruler 0.1.0 wheel (optional)."})
    questions: str = field(default="data/vqa_rad_dev/questions.json", metadata={"help": "Answers to build cases on."})


STYLES = (
    lambda a: a,
    lambda a: a.upper(),
    lambda a: f"{a}.",
    lambda a: f" {a} ",
    lambda a: f"The answer is {a}.",
    lambda a: f"Answer: {a}",
    lambda a: f"\\boxed{{{a}}}",
    lambda a: f"<think>hmm</think><answer>{a}</answer>",
    lambda a: f"I think it is {a}, but also something else.",
    lambda a: "It looks normal.",
    lambda a: "Yes, there is no effusion.",
    lambda a: "The eyes are fine",
    lambda a: "left lung",
    lambda a: "the left lower lobe of the lung shows an opacity",
    lambda a: "no",
    lambda a: "yes",
)


def _load_harness(root: Path, mathruler_dir: str | None):
    for name in ("google", "google.genai", "tenacity"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["google"].genai = sys.modules["google.genai"]
    sys.modules["tenacity"].retry = lambda *a, **k: lambda f: f
    sys.modules["tenacity"].stop_after_attempt = sys.modules["tenacity"].wait_fixed = lambda *a, **k: None
    if mathruler_dir:
        sys.modules.setdefault("pylatexenc", types.ModuleType("pylatexenc")).latex2text = None
        sys.path.insert(0, mathruler_dir)
    else:
        grader = types.ModuleType("mathruler.grader")
        grader.extract_boxed_content = mek.extract_boxed_content
        sys.modules["mathruler"], sys.modules["mathruler.grader"] = types.ModuleType("mathruler"), grader
    os.environ.setdefault("api_key", "unused")  # noqa: SIM112 - utils.py builds an OpenAI client at import; never called here
    package = types.ModuleType("mek_harness")
    package.__path__ = [str(root / "utils")]
    sys.modules["mek_harness"] = package

    def load(relative: str):
        name = "mek_harness." + relative.replace("/", ".").removesuffix(".py")
        for parent_index in range(1, name.count(".")):
            parent = ".".join(name.split(".")[: parent_index + 1])
            if parent not in sys.modules:
                module = types.ModuleType(parent)
                module.__path__ = [str(root / "utils" / Path(*parent.split(".")[1:]))]
                sys.modules[parent] = module
        spec = importlib.util.spec_from_file_location(name, root / "utils" / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return {
        "utils": load("utils.py"),
        "VQA_RAD": load("VQA_RAD/VQA_RAD.py").VQA_RAD,
        "SLAKE": load("SLAKE/SLAKE.py").SLAKE,
        "PATH_VQA": load("PATH_VQA/PATH_VQA.py").PATH_VQA,
        "mmmu": load("MMMU/eval_utils.py"),
    }


def _close(a, b) -> bool:
    return abs(float(a) - float(b)) < 1e-12


def main(args: Arguments) -> int:
    warnings.simplefilter("ignore")  # nltk's zero-overlap warnings, printed by the harness's BLEU per case
    harness = _load_harness(Path(args.medevalkit_dir), args.mathruler_dir)
    os.environ["use_llm_judge"] = "False"  # noqa: SIM112 - the harness reads this lower-case name
    questions = json.loads(Path(args.questions).read_text())
    cases = [
        (q["question"], style(str(q["answer"])), str(q["answer"]), q["answer_type"])
        for q in questions
        for style in STYLES
    ]
    disagreements, checked = 0, 0
    # Per-question open metrics and closed judgements (cases on which the harness does not abort).
    for _, response, answer, _ in cases:
        ours = mek.judge_open_end_vqa(answer, response)
        if ours["harness_error"]:
            continue
        theirs = harness["utils"].judge_open_end_vqa(answer, response)
        checked += 1
        disagreements += any(not _close(ours[k], theirs[k]) for k in theirs)
        checked += 2
        disagreements += mek.judge_judgement(answer, response) != harness["utils"].judge_judgement(answer, response)
        disagreements += mek.judge_close_end_vqa(answer, response) != harness["utils"].judge_close_end_vqa(
            answer, response
        )
    # Whole cal_metrics, per dataset flavour (answer-type labels as SLAKE writes them).
    for name, flavour in (("VQA_RAD", "vqa_rad"), ("PATH_VQA", "vqa_rad"), ("SLAKE", "slake")):
        usable = [
            c
            for c in cases
            if not mek.score_vqa_question(c[1], c[2], c[3], flavour).get("open", {}).get("harness_error")
        ]
        samples = [{"response": r, "answer": a, "question": q, "answer_type": t, "lang": "en"} for q, r, a, t in usable]
        dataset = harness[name].__new__(harness[name])
        theirs, out_samples = dataset.cal_metrics([dict(s) for s in samples])
        verdicts = [mek.score_vqa_question(s["response"], s["answer"], s["answer_type"], flavour) for s in samples]
        ours = mek.aggregate_vqa(verdicts)
        pairs = [
            (ours["overall_accuracy"], theirs["total metrics"]["acc"]),
            (ours["close"]["accuracy"], theirs["close"]["acc"]),
            (ours["open"]["acc_as_printed"], theirs["open"]["acc"]),
        ] + [(ours["open"][k], theirs["open"][k]) for k in mek.OPEN_SUM_KEYS]
        checked += len(pairs) + len(samples)
        disagreements += sum(not _close(a, b) for a, b in pairs)
        disagreements += sum(
            bool(v["correct"]) != bool(s["correct"]) for v, s in zip(verdicts, out_samples, strict=True)
        )
        print(
            f"{name}: {len(samples)} cases, MedEvalKit overall acc {theirs['total metrics']['acc']:.6f}, ours "
            f"{ours['overall_accuracy']:.6f}"
        )
    # Multiple choice: judge_multi_choice and MMMU's parser (where it does not fall back to random).
    choices = [" A:CT ", " B:MRI ", " C:X-ray ", " D:Ultrasound "]
    options = {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}
    replies = [
        "A",
        "b",
        "(C)",
        "The answer is D.",
        "MRI",
        "I would say C: X-ray",
        "",
        "maybe ultrasound",
        "B. MRI",
        "\\boxed{A}",
        "<answer>C</answer>",
        "It is (A) or (B), finally (B)",
        "x-ray image of the chest shows",
    ]
    for reply in replies:
        for letter in "ABCD":
            checked += 1
            disagreements += mek.judge_multi_choice(choices, letter, reply) != harness["utils"].judge_multi_choice(
                choices, letter, reply
            )
        parsed, ok = mek.mmmu_parse_multi_choice_response(reply, list(options), options, "q")
        if ok:
            checked += 1
            disagreements += parsed != harness["mmmu"].parse_multi_choice_response(reply, list(options), options)
    print(f"{checked} comparisons, {disagreements} disagreements")
    return 1 if disagreements else 0


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser((Arguments,)).parse_args_into_dataclasses()
    sys.exit(main(arguments))
