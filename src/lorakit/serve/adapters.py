"""The adapters a server holds on its one base model: lookup by request `model`, runtime loading and
unloading, a cap with least-recently-used eviction.

Bookkeeping (which adapters exist, their use order, how many requests hold each) lives on the event loop
thread only, so it needs no locks. Changing the model itself (loading, deleting adapter weights) runs on
the model thread through `run_on_model`, the same single thread that runs generation batches: a change
therefore never overlaps a batch. A request pins its adapter from acceptance to its last token, and pinned
adapters are neither evicted nor deleted — which covers the running batch and the requests queued for
the next one.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from lorakit.errors import LorakitError
from lorakit.io.pretrained import check_adapter_name
from lorakit.layers import BASE_ROW
from lorakit.model import PeftModel
from lorakit.serve.protocol import APIError

T = TypeVar("T")
RunOnModel = Callable[[Callable[[], T]], Awaitable[T]]


class AdapterPool:
    """Named adapters on `model`; `base_names` are the names that select no adapter."""

    def __init__(self, model: nn.Module, base_names: Iterable[str], run_on_model: RunOnModel,
                 max_adapters: int | None = None) -> None:
        self.model = model
        self.base_names = tuple(dict.fromkeys(base_names))
        self.max_adapters = max_adapters
        self._run = run_on_model
        self._paths: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._busy: set[str] = set()  # names being loaded or unloaded right now

    # ---- requests --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._paths)

    def path(self, name: str) -> Path:
        return self._paths[name]

    def acquire(self, requested: str) -> str:
        """The row name for a request's `model` (an adapter, or BASE_ROW), pinned until `release`."""
        if requested in self.base_names:
            return BASE_ROW
        if requested not in self._paths:
            known = ", ".join([*self.base_names[:1], *self._paths]) or "none"
            raise APIError(404, f"The model '{requested}' does not exist; available: {known}.", param="model",
                           code="model_not_found")
        self._paths.move_to_end(requested)
        self._pins[requested] += 1
        return requested

    def release(self, name: str) -> None:
        if name != BASE_ROW:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    # ---- loading and unloading -------------------------------------------------------------------

    def load_initial(self, specs: Iterable[tuple[str, Path]]) -> None:
        """Load adapters before the server starts (no event loop yet: straight on this thread)."""
        specs = list(specs)
        if self.max_adapters is not None and len(specs) > self.max_adapters:
            raise LorakitError(f"{len(specs)} adapters given but --max-adapters is {self.max_adapters}")
        for name, path in specs:
            try:
                self._check_new(name)
            except APIError as err:
                raise LorakitError(f"--adapter {name}={path}: {err.message}") from None
            self._load_now(name, path)
            self._paths[name] = path

    async def load(self, name: str, path: str) -> list[str]:
        """Load adapter `name` from `path`, evicting least recently used idle adapters beyond the cap.

        Returns the evicted names. The new adapter is loaded before anything is evicted, so a bad path
        leaves the pool as it was.
        """
        self._check_new(name)
        if self.max_adapters is not None and self.max_adapters < 1:
            raise APIError(409, "This server holds no adapters (--max-adapters 0).", code="adapter_limit")
        if self._over_cap() and not self._idle():
            raise APIError(409, f"All {len(self._paths)} adapters are in use by requests; try again later.",
                           code="adapter_limit")
        directory = Path(path).expanduser()
        if not (directory / "adapter_config.json").is_file():
            raise APIError(400, f"{path}: no adapter_config.json there.", param="path", code="invalid_adapter")
        self._busy.add(name)
        try:
            await self._run(lambda: self._load_now(name, directory))
        except (LorakitError, ValueError, OSError) as err:
            raise APIError(400, f"{path}: cannot load adapter: {err}", param="path", code="invalid_adapter") from None
        finally:
            self._busy.discard(name)
        self._paths[name] = directory
        evicted: list[str] = []
        while self.max_adapters is not None and len(self._paths) > self.max_adapters:
            idle = [n for n in self._idle() if n != name]
            if not idle:
                # Every other adapter got pinned while this one loaded: take the new one back out.
                await self.unload(name)
                raise APIError(409, "All adapters are in use by requests; try again later.", code="adapter_limit")
            evicted.append(idle[0])
            await self.unload(idle[0])
        return evicted

    async def unload(self, name: str) -> None:
        """Delete adapter `name` from the model; refused while requests use it."""
        if name in self.base_names:
            raise APIError(400, f"'{name}' is the base model, not an adapter.", param="name", code="invalid_adapter")
        if name not in self._paths or name in self._busy:
            raise APIError(404, f"No adapter named '{name}' is loaded.", param="name", code="adapter_not_found")
        if self._pins[name]:
            raise APIError(409, f"Adapter '{name}' is in use by {self._pins[name]} request(s).", param="name",
                           code="adapter_in_use")
        # Gone from lookups at once, so no new request pins it while the model thread deletes it.
        del self._paths[name]
        await self._run(lambda: self._delete_now(name))

    def _over_cap(self) -> bool:
        return self.max_adapters is not None and len(self._paths) >= self.max_adapters

    def _idle(self) -> list[str]:
        """Loaded adapters no request holds, least recently used first."""
        return [n for n in self._paths if not self._pins[n]]

    def _check_new(self, name: str) -> None:
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise APIError(400, str(err), param="name", code="invalid_value") from None
        if name in self.base_names or name == BASE_ROW:
            raise APIError(400, f"'{name}' names the base model; pick another adapter name.", param="name",
                           code="invalid_value")
        if name in self._paths or name in self._busy:
            raise APIError(409, f"An adapter named '{name}' is already loaded.", param="name", code="adapter_exists")

    # ---- on the model thread ---------------------------------------------------------------------

    def _load_now(self, name: str, path: Path) -> None:
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            # The first adapter turns the plain transformers model into a PeftModel.
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()

    def _delete_now(self, name: str) -> None:
        model: Any = self.model
        model.delete_adapter(name)
        # delete_adapter makes another adapter active and trainable (PEFT's rule); a server trains nothing.
        for other in model.peft_config:
            model.set_requires_grad(other, False)
