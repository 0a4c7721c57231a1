"""Judge pairwise (contra_) scores once both breasts' same view of a study is scored.

A pairwise score compares a view with the same view position of the other breast in the
same study. Each view's own per-view score is stored as soon as the view is scored (its
``reconstruction_error``), and ``z_score``, ``threshold`` and ``anomalous`` are filled
in for both views when the second of the two is scored. Until then the view carries a
warning that names the missing view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from model.scoring import Scorer, calibration_group, pairwise_value, statistics_for, threshold_for, z_score
from worker.db import ViewResult

logger = logging.getLogger(__name__)

OTHER_SIDE = {"L": "R", "R": "L"}
# Start of the warning on a view whose pair is missing; removed when the pair is judged.
MISSING_PAIR_PREFIX = "no z-score yet:"


@dataclass(frozen=True)
class Judgement:
    z_score: float | None
    threshold: float | None
    anomalous: bool | None
    calibration_group: str | None


def judge_value(scorer: Scorer, value: float, laterality: str | None, view_position: str | None) -> Judgement:
    """Judge a pairwise value against the checkpoint's calibration, as ``Scorer.judge_pair`` does."""
    calibration = scorer.checkpoint.calibration
    if not calibration:
        return Judgement(None, None, None, None)
    group, stats = statistics_for(calibration, calibration_group(laterality, view_position))
    threshold = threshold_for(stats, scorer.threshold_rule)
    return Judgement(z_score(value, stats), threshold, value > threshold, group)


def missing_pair_warning(result: ViewResult, score_name: str) -> str:
    if result.laterality not in OTHER_SIDE or not result.view_position:
        return (
            f"{MISSING_PAIR_PREFIX} the view's laterality or view position is unknown, so the other breast's "
            f"view cannot be found and the pairwise score {score_name} is not judged"
        )
    partner = f"{OTHER_SIDE[result.laterality]} {result.view_position}"
    return (
        f"{MISSING_PAIR_PREFIX} the other breast's view ({partner}) of this study is missing, and the "
        f"pairwise score {score_name} is judged when it is scored"
    )


def find_partner(session: Session, result: ViewResult) -> ViewResult | None:
    """Return the latest scored view of the other breast with the same view position, study and model."""
    other = OTHER_SIDE.get(result.laterality or "")
    if other is None or not result.view_position or not result.study_instance_uid:
        return None
    return session.scalar(
        select(ViewResult)
        .where(
            ViewResult.study_instance_uid == result.study_instance_uid,
            ViewResult.view_position == result.view_position,
            ViewResult.laterality == other,
            ViewResult.status == "scored",
            ViewResult.model_version == result.model_version,
            ViewResult.reconstruction_error.is_not(None),
            ViewResult.id != result.id,
        )
        .order_by(ViewResult.id.desc())
        .limit(1)
    )


def set_judgement(result: ViewResult, judgement: Judgement) -> None:
    result.z_score = judgement.z_score
    result.threshold = judgement.threshold
    result.anomalous = judgement.anomalous
    result.calibration_group = judgement.calibration_group
    kept = [line for line in (result.warnings or "").split("\n") if line and not line.startswith(MISSING_PAIR_PREFIX)]
    result.warnings = "\n".join(kept) or None


def add_warning(result: ViewResult, warning: str) -> None:
    lines = [line for line in (result.warnings or "").split("\n") if line]
    if warning not in lines:
        lines.append(warning)
    result.warnings = "\n".join(lines)


def judge_with_partner(session: Session, result: ViewResult, scorer: Scorer) -> ViewResult | None:
    """Judge a newly scored view and its partner, or mark the view as waiting for its partner.

    Returns the partner when one was found. Both rows are changed in ``session`` and
    committed by the caller.
    """
    name = scorer.definition.name
    partner = find_partner(session, result)
    if partner is None:
        set_judgement(result, Judgement(None, None, None, None))
        add_warning(result, missing_pair_warning(result, name))
        return None
    own_value = pairwise_value(result.reconstruction_error, partner.reconstruction_error)
    set_judgement(result, judge_value(scorer, own_value, result.laterality, result.view_position))
    partner_value = pairwise_value(partner.reconstruction_error, result.reconstruction_error)
    set_judgement(partner, judge_value(scorer, partner_value, partner.laterality, partner.view_position))
    logger.info(
        "Judged %s of views %s and %s of study instance %s: z=%s and z=%s",
        name,
        result.sop_instance_uid,
        partner.sop_instance_uid,
        result.study_instance_uid,
        result.z_score,
        partner.z_score,
    )
    return partner
