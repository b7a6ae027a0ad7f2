"""The edit-case record every part shares, and what makes one unusable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORING_FAMILIES = ("counterfact", "zsre")


class DatasetError(ValueError):
    """A dataset file or record that cannot be read; the message is one line."""


@dataclass(frozen=True)
class EditCase:
    case_id: str
    relation: str
    subject: str
    prompt: str  # template with "{}" where the subject goes
    target_true: str  # no leading space
    target_new: str  # no leading space
    paraphrases: tuple[str, ...]  # full prompts
    neighborhood: tuple[tuple[str, str], ...]  # (full prompt, true answer)
    # optional parts; the defaults keep older callers and files working
    portability: tuple[tuple[str, str], ...] = ()  # (full prompt, answer after the edit)
    generation_prompts: tuple[str, ...] = ()  # open-ended prompts about the subject (CounterFact)
    attribute_prompts: tuple[str, ...] = ()  # other subjects whose true answer is target_new
    reference_texts: tuple[str, ...] = ()  # text about target_new, for reference consistency
    locality: tuple[tuple[str, str], ...] = ()  # (prompt, answer) when distinct from the neighbourhood
    scoring: str = "counterfact"  # the primary metric family: "counterfact" or "zsre"

    @property
    def rewrite_prompt(self) -> str:
        # str.replace rather than str.format: braces inside subjects stay literal
        return self.prompt.replace("{}", self.subject)

    @property
    def locality_pairs(self) -> tuple[tuple[str, str], ...]:
        """Prompts for EasyEdit locality: the dedicated set, else the neighbourhood."""
        return self.locality or self.neighborhood

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case_id": self.case_id,
            "relation": self.relation,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_true": self.target_true,
            "target_new": self.target_new,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [{"prompt": p, "answer": a} for p, a in self.neighborhood],
        }
        for key in ("portability", "locality"):
            if getattr(self, key):
                out[key] = [{"prompt": p, "answer": a} for p, a in getattr(self, key)]
        for key in ("generation_prompts", "attribute_prompts", "reference_texts"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.scoring != "counterfact":
            out["scoring"] = self.scoring
        return out



def validate_case(case: EditCase) -> str | None:
    """Return why ``case`` is unusable, or None when it is fine."""
    if not case.subject.strip():
        return "subject is empty"
    if "{}" not in case.prompt:
        return (f"subject {case.subject!r} not found in prompt {case.prompt!r} "
                f"(template has no '{{}}' placeholder)")
    if not case.target_true.strip():
        return "target_true is empty"
    if not case.target_new.strip():
        return "target_new is empty"
    if case.target_new.strip().lower() == case.target_true.strip().lower():
        return f"target_new equals target_true ({case.target_true.strip()!r})"
    if case.scoring not in SCORING_FAMILIES:
        return f"scoring {case.scoring!r} is not one of {', '.join(SCORING_FAMILIES)}"
    if not case.neighborhood:
        return "no neighbourhood prompts (NS and the drift KL need at least one)"
    for group in ("neighborhood", "portability", "locality"):
        for i, (prompt, answer) in enumerate(getattr(case, group)):
            if not prompt.strip() or not answer.strip():
                return f"{group}[{i}] has an empty prompt or answer"
    return None
