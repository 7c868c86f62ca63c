"""Adapters by name: verified folders inside one root, resident in the model up to a limit (LRU).

An adapter becomes servable only after ``verify_adapter`` (SHA-256 of the weights and of the
config, base-model fingerprint) and ``moelora.read_expert`` (supported LoRA options, widths)
passed; it is then made resident with ``add_expert`` between two engine steps. At most
``max_loaded`` adapters are resident (the gate's experts included, and never evicted); to make
room the least recently used adapter with no request in flight is evicted (``remove_expert``) and
stays registered: its next request reloads it (verified again). A request names adapters, never
paths: ``lora_path`` is resolved inside ``root`` and refused if it leaves it (``..``, absolute
paths, symlinks out). Every method runs on the server's event loop; one lock per name orders
loads and unloads of a name, one residency lock orders evictions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from loralab.artifacts import AdapterVerificationError, verify_adapter
from loralab.serving.engine import BatchEngine
from loralab.serving.errors import APIError, bad_request, not_found, unavailable
from moelora import ExpertError, MoELoraModel, read_expert

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Adapter:
    name: str
    folder: Path
    root: str  # the folder relative to the adapter root (what /v1/models shows)
    sha256: str
    pinned: bool = False  # never evicted
    gate_expert: bool = False  # mixed by the gate: resident for good
    resident: bool = True
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    unloading: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterRegistry:
    def __init__(
        self,
        engine: BatchEngine,
        model: MoELoraModel,
        root: Path,
        base_fingerprint: str,
        max_loaded: int,
        reserved: set[str],
        wait_s: float = 30.0,
        on_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.engine, self.model = engine, model
        self.root = root.resolve()
        self.base_fingerprint = base_fingerprint
        self.max_loaded = max_loaded
        self.reserved = reserved  # names that are modes (base, auto, moe, the base's name)
        self.wait_s = wait_s
        self.on_change = on_change  # (resident count, evicted) after every change
        self._adapters: dict[str, Adapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._residency = asyncio.Lock()
        self._released = asyncio.Condition()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, name: str) -> Adapter | None:
        adapter = self._adapters.get(name)
        return None if adapter is None or adapter.unloading else adapter

    def adapters(self) -> list[Adapter]:
        return [a for a in self._adapters.values() if not a.unloading]

    def resident_count(self) -> int:
        return sum(a.resident for a in self._adapters.values())

    # -- start-up --------------------------------------------------------------------------------

    def add_resident(self, name: str, folder: Path, sha256: str, gate_expert: bool) -> None:
        """An expert the model was built with: pinned (never evicted); a gate expert can never
        be unloaded either (the gate has a slot for it)."""
        self._adapters[name] = Adapter(
            name, folder, self._relative(folder), sha256, pinned=True, gate_expert=gate_expert
        )
        self._changed(False)

    # -- the API ---------------------------------------------------------------------------------

    async def load(self, name: str, lora_path: str, pinned: bool = False) -> Adapter:
        """POST /v1/load_lora_adapter: verify, register and make resident (evicting if needed)."""
        if not NAME.match(name):
            raise bad_request(
                f"lora_name {name!r}: use 1-64 letters, digits, '.', '_' or '-'", "lora_name"
            )
        if name in self.reserved:
            raise bad_request(f"lora_name {name!r} is reserved for a serving mode", "lora_name")
        async with self._lock(name):
            if name in self._adapters:
                raise bad_request(f"the adapter {name!r} is already loaded", "lora_name")
            folder = self.resolve(lora_path)
            expert = await asyncio.to_thread(self._read, name, folder)
            adapter = Adapter(name, folder, self._relative(folder), expert.info.adapter_sha256)
            adapter.pinned, adapter.resident = pinned, False
            adapter.in_flight += 1  # not evictable until it is registered
            try:
                async with self._residency:
                    await self._make_room()
                    await self._engine_call(lambda: self.model.add_expert(expert))
                adapter.resident = True
                self._adapters[name] = adapter
            finally:
                adapter.in_flight -= 1
            self._changed(False)
            log.info("adapter %s loaded from %s", name, folder)
            return adapter

    async def unload(self, name: str) -> None:
        """POST /v1/unload_lora_adapter: waits for the requests in flight on it, then removes it."""
        async with self._lock(name):
            adapter = self.get(name)
            if adapter is None:
                raise not_found(f"the adapter {name!r} is not loaded", "lora_name")
            if adapter.gate_expert:
                raise bad_request(
                    f"the adapter {name!r} is one of the MoE-LoRA gate's experts "
                    f"{self.model.gate_expert_names} and cannot be unloaded",
                    "lora_name",
                )
            adapter.unloading = True  # new requests for it get 404 from now on
            async with self._released:
                await self._released.wait_for(lambda: adapter.in_flight == 0)
            async with self._residency:
                if adapter.resident:
                    await self._engine_call(lambda: self.model.remove_expert(name))
            del self._adapters[name]
            self._changed(False)
            log.info("adapter %s unloaded", name)

    async def acquire(self, name: str) -> Adapter:
        """Reserve an adapter for one request (reloading it if it was evicted); release() after."""
        adapter = self.get(name)
        if adapter is None:
            raise not_found(f"the model {name!r} does not exist")
        adapter.in_flight += 1
        try:
            if not adapter.resident:
                async with self._residency:
                    if not adapter.resident:
                        await self._reload(adapter)
        except BaseException:
            await self.release(adapter)
            raise
        adapter.last_used = time.monotonic()
        return adapter

    async def release(self, adapter: Adapter) -> None:
        adapter.in_flight -= 1
        async with self._released:
            self._released.notify_all()

    # -- paths -----------------------------------------------------------------------------------

    def resolve(self, lora_path: str) -> Path:
        """``lora_path`` inside the adapter root, or a 400 saying why not."""
        if "\x00" in lora_path or "\\" in lora_path:
            raise bad_request("lora_path must be a plain relative path", "lora_path")
        relative = PurePosixPath(lora_path)
        if relative.is_absolute() or ".." in relative.parts:
            raise bad_request(
                f"lora_path {lora_path!r} must be relative to the adapter root, without '..'",
                "lora_path",
            )
        folder = (self.root / relative).resolve()
        if not folder.is_relative_to(self.root):
            raise bad_request(f"lora_path {lora_path!r} leaves the adapter root", "lora_path")
        if not folder.is_dir():
            raise not_found(f"lora_path {lora_path!r}: no such adapter folder", "lora_path")
        return folder

    def _relative(self, folder: Path) -> str:
        resolved = folder.resolve()
        return (
            str(resolved.relative_to(self.root))
            if resolved.is_relative_to(self.root)
            else folder.name
        )

    # -- internals -------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _read(self, name: str, folder: Path) -> Any:
        """Verify the folder (hashes, base fingerprint) and read the expert: 400 when it fails."""
        try:
            verify_adapter(folder, self.base_fingerprint)
            return read_expert(name, folder)
        except (AdapterVerificationError, ExpertError) as error:
            raise bad_request(f"adapter {name!r} refused: {error}", "lora_path") from None

    async def _reload(self, adapter: Adapter) -> None:
        try:
            expert = await asyncio.to_thread(self._read, adapter.name, adapter.folder)
        except (
            APIError
        ) as error:  # the files changed since they were loaded: not the client's fault
            message = f"the adapter {adapter.name!r} cannot be reloaded: {error.message}"
            raise unavailable(message) from None
        if expert.info.adapter_sha256 != adapter.sha256:
            raise unavailable(f"the adapter {adapter.name!r} changed on disk since it was loaded")
        await self._make_room()
        await self._engine_call(lambda: self.model.add_expert(expert))
        adapter.resident = True
        self._changed(False)

    async def _make_room(self) -> None:
        """Evict least recently used adapters until one more fits (waits for one to be free)."""
        deadline = time.monotonic() + self.wait_s
        while self.resident_count() >= self.max_loaded:
            free = [
                a
                for a in self._adapters.values()
                if a.resident and not a.pinned and not a.gate_expert and a.in_flight == 0
            ]
            if free:
                victim = min(free, key=lambda a: a.last_used)
                await self._engine_call(partial(self.model.remove_expert, victim.name))
                victim.resident = False
                self._changed(True)
                log.info("adapter %s evicted (LRU)", victim.name)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise unavailable(
                    f"no adapter slot is free: {self.resident_count()} of "
                    f"server.max_loaded_adapters={self.max_loaded} are pinned or in use"
                )
            async with self._released:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._released.wait(), timeout=left)

    async def _engine_call(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(self.engine.call_between_steps(fn))
        except ExpertError as error:
            raise bad_request(str(error), "lora_path") from None

    def _changed(self, evicted: bool) -> None:
        if self.on_change is not None:
            self.on_change(self.resident_count(), evicted)
