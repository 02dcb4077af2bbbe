"""Loading a state dict that must fit a model exactly, with a one-line error naming the first key that does not."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from msad.errors import UserError


def load_state_strictly(
    model: nn.Module,
    state: Mapping[str, object],
    source: str,
    ignore_prefixes: Sequence[str] = (),
    key_in_state: Callable[[str], str | None] | None = None,
) -> None:
    """Load ``state`` into ``model`` only if it fits exactly; otherwise raise UserError naming the first bad key.

    Every model key must be in ``state`` with the same shape, and every ``state`` key must be a model key unless it
    starts with one of ``ignore_prefixes``. Checked before loading, so a bad state never half-loads a model.
    Messages use the state's own key names, which the user can find in the file.

    Args:
        model: the module to fill.
        state: tensors keyed like ``model.state_dict()``, or as ``key_in_state`` maps them.
        source: what ``state`` came from ("weights file x.pt", "teacher state"), for the message.
        ignore_prefixes: key prefixes ``state`` may carry that the model has no counterpart for.
        key_in_state: the state's name of each model key (another library's naming); None for a model key the
            state does not provide, which keeps its current value. Default: the same names.
    """
    names = {ours: key_in_state(ours) if key_in_state else ours for ours in model.state_dict()}
    expected = {theirs: tensor for (ours, tensor), theirs in zip(model.state_dict().items(), names.values(),
                                                                 strict=True) if theirs is not None}
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(f"{source} is missing key {key!r}, which the model needs")
        found = state[key]
        if not isinstance(found, Tensor) or found.shape != tensor.shape:
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise UserError(
                f"{source}: key {key!r} has shape {shape}, the model expects shape {tuple(tensor.shape)} "
                "(built with another width, widths list, fpn_channels, head or class count?)"
            )
    for key in state:
        if key not in expected and not key.startswith(tuple(ignore_prefixes)):
            raise UserError(f"{source} has unexpected key {key!r}, which no module of the model matches")
    partial = len(expected) < len(names)
    model.load_state_dict({ours: state[theirs] for ours, theirs in names.items() if theirs is not None},
                          strict=not partial)
