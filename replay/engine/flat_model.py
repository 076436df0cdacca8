"""A model whose recorded parameters live in one flat buffer, and whose gradients land in another.

Moving along the chord θ_t + sΔ is then one vector operation, and the gradient of every
parameter is read as one (D,) tensor without copies. Parameter order is the trajectory's
canonical order, so offsets match the store and the groupings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from replay.errors import TaskError


class FlatModel:
    """Binds ``model``'s recorded parameters to views of ``theta`` (D,) and ``grad`` (D,).

    ``names`` are the model's parameter names to bind, in flat order; ``source`` maps each to
    the recorded tensor it takes its values from (itself, or for a use of a tied tensor split
    by :mod:`replay.engine.tied`, the tensor's recorded name).
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str],
                 shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device, *, where: str = "the task",
                 source: Mapping[str, str] | None = None):
        self.dtype, self.device = dtype, torch.device(device)
        self.names = list(names)
        self.source = {n: n for n in self.names} if source is None else dict(source)
        self.shapes = {n: tuple(shapes[n]) for n in self.names}
        model = model.to(device=self.device)
        # Floating parameters and buffers take the replay precision; integer buffers stay.
        model = model.to(dtype=dtype)
        model.eval()
        every = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.names if n not in every]
        if missing:
            raise TaskError(
                f"{where} builds a model without the recorded parameter(s) "
                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                "the task must build the recorded architecture (check its arguments)"
            )
        for name in self.names:
            got = tuple(every[name].shape)
            if got != self.shapes[name]:
                raise TaskError(
                    f"parameter {name!r} has shape {got} in the model built by {where} but "
                    f"{self.shapes[name]} in the trajectory; the task must build the recorded "
                    "architecture (check its arguments)"
                )
        recorded = {id(every[n]) for n in self.names}
        for p in model.parameters():
            if id(p) not in recorded:
                p.requires_grad_(False)  # frozen in training: restored as state, not analysed
        self.numels = np.array([int(np.prod(self.shapes[n], dtype=np.int64)) for n in self.names],
                               dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.theta = torch.zeros(total, dtype=dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=dtype, device=self.device)
        for i, name in enumerate(self.names):
            p = every[name]
            p.requires_grad_(True)
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            p.data = self.theta[a:b].view(self.shapes[name])
            p.grad = self.grad[a:b].view(self.shapes[name])
        self.model = model
        self._params = [every[n] for n in self.names]
        self._grads = [p.grad for p in self._params]  # the views bound above
        self._state = {**dict(model.named_parameters(remove_duplicate=False)),
                       **dict(model.named_buffers(remove_duplicate=False))}

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Recorded parameters (name -> tensor, any dtype) as one (D,) tensor in the replay dtype."""
        out = torch.empty(self.size, dtype=self.dtype, device=self.device)
        for i, name in enumerate(self.names):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            out[a:b].copy_(params[self.source[name]].reshape(-1))
        return out

    def flatten_flats(self, flats: Mapping[torch.dtype, torch.Tensor], layout) -> torch.Tensor:
        """θ from a trajectory's flat buffers (:meth:`Trajectory.walk_flat`): the buffer itself
        when it already is this model's flat vector (one dtype, the replay's, same order, no
        tied split, on this device), so θ is not held twice; else a copy (:meth:`flatten`).
        The result is then shared with the walk: it is read, never written."""
        if self._same_layout(layout) and flats[self.dtype].device == self.device:
            return flats[self.dtype]
        return self.flatten(layout.split(flats))

    def _same_layout(self, layout) -> bool:
        return (list(layout.groups) == [self.dtype] and layout.groups[self.dtype] == self.names
                and all(self.source[n] == n for n in self.names))

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Frozen parameters and buffers recorded for this step (not integrated)."""
        with torch.no_grad():
            for name, value in state.items():
                target = self._state.get(name)
                if target is None:
                    raise TaskError(
                        f"recorded state tensor {name!r} has no counterpart in the model built "
                        "by the task; the task must build the recorded architecture"
                    )
                target.copy_(value.to(target.dtype))

    def check_bound(self) -> None:
        """Autograd must have accumulated into our buffer, not replaced ``.grad``."""
        for p, view, name in zip(self._params, self._grads, self.names):
            g = p.grad
            if g is not view and (g is None or g.untyped_storage().data_ptr() !=
                                  self.grad.untyped_storage().data_ptr()):
                raise TaskError(
                    f"the gradient of {name!r} was replaced during backward (is loss() calling "
                    "zero_grad or an optimizer?); loss() must only compute the loss"
                )

    def locate(self, flat_index: int) -> str:
        """The parameter name holding element ``flat_index`` of the flat vector."""
        i = int(np.searchsorted(self.offsets, flat_index, side="right")) - 1
        return self.names[i]

    def first_nonfinite(self, vec: torch.Tensor) -> str | None:
        """The parameter holding ``vec``'s first non-finite element, or None."""
        # A finite sum proves every element finite (a NaN or ±Inf makes it non-finite), in one
        # pass without a (D,) mask; only a non-finite sum (which overflow alone can give) pays
        # for the search.
        if torch.isfinite(vec.sum()):
            return None
        bad = (~torch.isfinite(vec)).nonzero()
        return None if bad.numel() == 0 else self.locate(int(bad[0, 0]))
