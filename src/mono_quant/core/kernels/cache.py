"""Cache of prepacked kernel weights, rebuilt whenever the tensors they were built from change."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

_Sources = Sequence[torch.Tensor | None]


def tensor_versions(sources: _Sources) -> tuple[int, ...]:
    """Return the version counter of each tensor, -1 for None and for inference tensors."""
    return tuple(-1 if tensor is None else _version(tensor) for tensor in sources)


def _version(tensor: torch.Tensor) -> int:
    # Tensors made under torch.inference_mode have no version counter; identity still applies.
    try:
        return tensor._version
    except RuntimeError:
        return -1


class KernelCache:
    """Prepacked weights of one layer, keyed by kernel name.

    Each entry remembers its source tensors (codes, scale, bias) by weak reference and version
    counter. Replacing a buffer (``.to()``, ``load_state_dict`` with ``assign=True``) or writing
    into it in place (``load_state_dict``, ``copy_``) makes the entry stale, and the next
    :meth:`get` rebuilds it. A deep copy or an unpickled copy starts empty, so no packed weight
    of the original is shared or saved.

    NOTE: a packed weight is a second copy of the weight in the kernel's layout, kept next to
    the stored codes and about as large as they are.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[Any, ...], Any]] = {}
        # The last dispatch decision of the layer (see ``remember``), dropped with the entries.
        self._decision: tuple[Any, ...] | None = None

    @staticmethod
    def _signature(sources: _Sources) -> tuple[Any, ...]:
        return tuple(
            None if tensor is None else (weakref.ref(tensor), _version(tensor))
            for tensor in sources
        )

    @staticmethod
    def _matches(signature: tuple[Any, ...], sources: _Sources) -> bool:
        if len(signature) != len(sources):
            return False
        for entry, tensor in zip(signature, sources, strict=True):
            if entry is None or tensor is None:
                if entry is not tensor:
                    return False
                continue
            reference, version = entry
            if reference() is not tensor or _version(tensor) != version:
                return False
        return True

    def get(self, name: str, sources: _Sources, build: Callable[[], Any]) -> Any:
        """Return the entry ``name`` built from ``sources``, calling ``build`` when it is stale.

        ``build`` may return None to record that the kernel does not apply. That result is
        cached like a packed weight.
        """
        entry = self._entries.get(name)
        if entry is not None and self._matches(entry[0], sources):
            return entry[1]
        self._entries.pop(name, None)
        value = build()
        self._entries[name] = (self._signature(sources), value)
        return value

    def clear(self) -> None:
        """Drop every entry and the remembered decision."""
        self._entries.clear()
        self._decision = None

    def remember(self, key: tuple[Any, ...], sources: _Sources, decision: Any) -> None:
        """Keep ``decision`` for calls with ``key`` while ``sources`` stay unchanged.

        Unlike the entries, this keeps references to the sources, so it is checked with ``is``
        and version counters alone. A replaced buffer stays alive until the next decision.
        """
        self._decision = (key, tuple(sources), tensor_versions(sources), decision)

    def recall(self, key: tuple[Any, ...], sources: _Sources) -> Any | None:
        """Return the decision kept for ``key`` if ``sources`` are the same, unchanged tensors."""
        remembered = self._decision
        if remembered is None or remembered[0] != key:
            return None
        for old, new in zip(remembered[1], sources, strict=True):
            if old is not new:
                return None
        if remembered[2] != tensor_versions(sources):
            return None
        return remembered[3]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelCache:
        return KernelCache()

    def __reduce__(self) -> tuple[type[KernelCache], tuple[()]]:
        return (KernelCache, ())

    def __repr__(self) -> str:
        return f"KernelCache({sorted(self._entries)})"
