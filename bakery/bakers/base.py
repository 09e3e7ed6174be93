"""The base classes of a registered method: :class:`Baker` (builds the weights of a bake) and
:class:`ClosedFormBaker` (plans tensor edits of the source checkpoint)."""

from __future__ import annotations

from bakery.bakers.plan import BakePlan, Weights
from bakery.bakers.request import BakeRequest
from bakery.io.checkpoint import CheckpointReader


class Baker:
    """A registered method. ``config_class`` is its one typed config; ``uses_coef``: whether a
    term's strength means anything to it; ``max_terms``: how many terms it can bake at once."""

    name: str = ""
    config_class: type = object
    uses_coef: bool = True
    max_terms: int | None = None

    def name_tags(self, req: BakeRequest) -> tuple[list[str], list[str]]:
        """Words of the default output folder's name before and after ``L{layer}``."""
        return [], []

    def build(self, req: BakeRequest, *, progress: bool) -> Weights | None:
        """The weights to write (``None`` on the non-main processes of a distributed run)."""
        raise NotImplementedError


class ClosedFormBaker(Baker):
    """A baker that edits the checkpoint tensor by tensor: subclasses implement :meth:`plan`."""

    def plan(self, req: BakeRequest, reader: CheckpointReader) -> BakePlan:
        raise NotImplementedError

    def build(self, req: BakeRequest, *, progress: bool) -> Weights:
        return self.plan(req, CheckpointReader(req.model_dir))
