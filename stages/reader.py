"""DVC stage ``reader``: a second reader of generated scenes, trained like the judge
(``stages.judge``) from its own ``reader`` section -- another seed and shape, no weights shared
with the judge. ``align`` optimises the judge's reading; evaluation reports this reader's
GenEval-style score beside the judge's, so that a gain the judge alone sees shows up."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from stages.judge import fit_reader

    return fit_reader(params, "reader")
