"""`BankClient`: the whole sharded bank behind one object, in global indices.

It routes index g to shard ``g % S`` (local row ``g // S``), fans the per-shard
requests out in parallel (the last on the caller's thread, the others on threads the
client keeps from call to call), reassembles answers in the caller's order, splits
Update, Lookup and Sample requests whose messages would be large, and retries
UNAVAILABLE with exponential backoff inside the call's deadline. Updates carry
``(client_id, sequence)`` so a retried update is applied once. A Step is one message
per shard; one that might not fit is refused before anything is sent
(:meth:`BankClient.check_step`).

A shard that stops answering is logged once (WARNING: shard, address, status), again
only every few seconds while it stays out, and once when it answers again (INFO: how
long, how many retries); ``outages()`` lists every outage for a run's summary
(:mod:`bank_server.outages`).

Addresses are listed in any order, or given as one template with ``{shard}`` in it
(a StatefulSet's stable names). A shard that may move (a Ray actor that restarted on
another port) is found again through ``resolve(shard, timeout_s) -> address``.

It speaks numpy: array-likes go in (anything ``np.asarray`` takes, CPU torch tensors
included), numpy arrays come out; the bulk answers are read by :mod:`bank_server.wire`
as views of the received bytes. Updates and reads bound for several shards are checked
whole by :mod:`bank_server.validate`, the shards' own checks, before they go out: the
shards validate only their own parts, and a request must be accepted by all or none;
one shard checks all of it itself. A mistake reads the same whichever side catches it:
`InvalidArgument`, the same message.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from bank_server import tensors, validate, wire
from bank_server.errors import InvalidArgument
from bank_server.merge import merge_partition_sums, merge_topk
from bank_server.outages import OutageTracker
from bank_server.protocol import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, grpc_options, step_message_bytes
from protos import bank_pb2, bank_pb2_grpc

log = logging.getLogger(__name__)

# One address with this in it names every shard: "bank-{shard}.bank:50051". Shard 0
# says how many there are, so a deployment sets the shard count in one place.
SHARD_PLACEHOLDER = "{shard}"
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# A fan-out's calls at once on threads (the last goes on the caller's): more wait for one.
_CALL_THREADS = 64
_MIB = 1 << 20


def _stub(channel: grpc.Channel) -> bank_pb2_grpc.MemoryBankStub:
    """The generated stub, with the bulk methods returning their answers' bytes for
    `bank_server.wire` to read (as numpy views, without protobuf's copies)."""
    stub = bank_pb2_grpc.MemoryBankStub(channel)
    for method, request in (
        ("Step", bank_pb2.StepRequest),
        ("Lookup", bank_pb2.LookupRequest),
        ("Sample", bank_pb2.SampleRequest),
    ):
        setattr(
            stub,
            method,
            channel.unary_unary(
                f"/{SERVICE_NAME}/{method}", request_serializer=request.SerializeToString, response_deserializer=None
            ),
        )
    return stub


def _shard_seed(rng: np.random.Generator, seed: int | None) -> int | None:
    """A shard's seed for its draws, from a seeded call's generator (None: unseeded)."""
    return None if seed is None else int(rng.integers(2**63))


class BankRpcError(RuntimeError):
    """A shard answered with an error status (after retries, for UNAVAILABLE), or with an
    answer the client cannot use (INTERNAL: e.g. another number of draws than asked)."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str):
        super().__init__(f"{address}: {code.name}: {details}")
        self.code, self.details, self.address = code, details, address

    def __reduce__(self):  # Ray pickles errors across processes
        return type(self), (self.code, self.details, self.address)


class RequestRejected(BankRpcError, InvalidArgument):
    """A shard found the request invalid (INVALID_ARGUMENT). It reads exactly as the same
    mistake caught by the client's own checks (`InvalidArgument`, the same message), so
    callers need not care which side caught it; `address` still says which shard."""

    def __str__(self) -> str:
        return self.details


class LayoutError(ValueError):
    """The addresses do not form one complete bank."""


def negative_places(k: int, total_rows: int, num_shards: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Which of k i.i.d. uniform draws over all N rows each shard makes: place j goes to
    shard g % S of a uniform global row g, i.e. to shard s with probability rows_s / N,
    independently of every other place (so the shares are multinomial). Shard s's own
    uniform draws then fill its places in order (`placed_draws`), and every place is an
    independent uniform row of the bank: any prefix is uniform too. None with one shard:
    its k draws are the answer as they come."""
    if num_shards == 1:
        return None
    shard = rng.integers(0, total_rows, size=k, dtype=np.int64) % num_shards
    order = np.argsort(shard, kind="stable")  # each shard's places stay in order
    return np.split(order, np.cumsum(np.bincount(shard, minlength=num_shards))[:-1])


def _shares(k: int, places: list[np.ndarray] | None) -> list[int]:
    return [k] if places is None else [len(where) for where in places]


def placed_draws(
    k: int,
    places: list[np.ndarray] | None,
    draws: dict[int, list[tuple[np.ndarray, np.ndarray]]],
    addresses: Sequence[str],
    dim: int,
    dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's draws ((indices, rows) parts, in the order they came) in its
    `places` (see `negative_places`); one shard's as they came, not copied. A shard
    answering another number of draws than it was asked for is an error, not a short
    answer."""
    for s, asked in enumerate(_shares(k, places)):
        answered = sum(len(idx) for idx, _ in draws.get(s, ()))
        if answered != asked:
            raise BankRpcError(
                grpc.StatusCode.INTERNAL,
                f"shard {s} answered {answered} draws for the {asked} it was asked for",
                addresses[s],
            )
    if places is None:  # one shard: its draws in the order they came
        parts = draws[0]
        return parts[0] if len(parts) == 1 else tuple(np.concatenate(part) for part in zip(*parts))
    out_idx = np.empty(k, dtype=np.int64)
    out_rows = np.empty((k, dim), dtype=dtype)
    for s, where in enumerate(places):
        begin = 0
        for idx, rows in draws.get(s, ()):
            at = where[begin : begin + len(idx)]
            out_idx[at] = idx
            out_rows[at] = rows
            begin += len(idx)
    return out_idx, out_rows


@dataclass
class StepResult:
    rows: np.ndarray  # (len(lookup_indices), D) positives, caller's order
    negative_indices: np.ndarray  # (negatives,) global indices, uniform over all N rows
    negative_rows: np.ndarray  # (negatives, D)
    updates_applied: int  # shards that applied the update (retries count once)


class BankClient:
    def __init__(
        self,
        addresses: Sequence[str] | str,
        token: str | None = None,
        timeout: float = 30.0,
        tls_ca: str | bytes | None = None,
        max_message_bytes: int | None = None,
        chunk_bytes: int = 4 << 20,
        client_id: str | None = None,
        resolve: Callable[[int, float], str] | None = None,
    ):
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        if not addresses:
            raise LayoutError("no bank addresses given")
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._resolve = None  # until the layout is known: positions are shard ids from then on
        self.client_id = client_id or uuid.uuid4().hex
        self._sequence = itertools.count(1)
        self._rng = np.random.default_rng()  # one generator: seeding a new one per call reads OS entropy
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # Without a limit of its own, the client takes the one its shards advertise.
        self._options = grpc_options(max_message_bytes or -1)
        self._credentials = None
        if tls_ca is not None:
            ca = tls_ca if isinstance(tls_ca, bytes) else open(tls_ca, "rb").read()
            self._credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        self._channels, self._addresses, self._stubs = [], [], []
        # Threads for the calls of a fan-out but its last, made when first needed and kept.
        # Python joins them at exit: a client left open with a call in flight to a stuck
        # shard holds the exit up to the call's deadline (close() ends such calls at once).
        self._calls = ThreadPoolExecutor(
            max_workers=_CALL_THREADS, thread_name_prefix=f"bank-client-{self.client_id[:8]}"
        )
        self._moved = threading.Lock()
        self._retired: list[grpc.Channel] = []  # channels of shards that moved: calls may still be on them
        # Outages are tracked once positions are shard ids (a bank still starting is not an outage).
        self._outages: OutageTracker | None = None
        template = addresses[0] if len(addresses) == 1 and SHARD_PLACEHOLDER in addresses[0] else None
        try:
            infos = self._connect([template.format(shard=0)] if template else list(addresses))
            if template:  # the bank says how many shards it has
                infos += self._connect([template.format(shard=s) for s in range(1, infos[0].num_shards)])
            self._check_layout(infos)
        except BaseException:
            self.close()
            raise
        # From here on, position s in the lists is shard s.
        order = sorted(range(len(infos)), key=lambda i: infos[i].shard_id)
        self._stubs = [self._stubs[i] for i in order]
        self._addresses = [self._addresses[i] for i in order]
        self._channels = [self._channels[i] for i in order]
        self.num_shards = infos[0].num_shards
        self.rows = infos[0].total_rows
        self.dim = infos[0].dim
        self.dtype = np.dtype(tensors.NUMPY_DTYPES[infos[0].dtype]).name
        self.shard_rows = np.array([infos[i].rows_held for i in order], dtype=np.int64)
        self._row_bytes = self.dim * np.dtype(self.dtype).itemsize
        limits = [d.max_message_bytes for d in infos if d.max_message_bytes] + [max_message_bytes or 0]
        self.max_message_bytes = min((n for n in limits if n), default=DEFAULT_MAX_MESSAGE_BYTES)
        # Split requests stay well inside the smallest limit either end enforces.
        self.chunk_bytes = min(chunk_bytes, self.max_message_bytes // 2)
        self._resolve = resolve
        self._outages = OutageTracker()

    def outages(self) -> list[dict]:
        """Every time a shard was unreachable since this client connected, oldest first:
        ``{"shard", "address", "code", "started" (unix time), "seconds", "retries",
        "ongoing"}`` (an ongoing one with its seconds so far). For a run's summary."""
        return self._outages.outages() if self._outages is not None else []

    def _connect(self, addresses: list[str]) -> list:
        """Open channels to more shards; returns their Describe answers."""
        first = len(self._stubs)
        for address in addresses:
            channel = self._channel(address)
            self._channels.append(channel)
            self._addresses.append(address)
            self._stubs.append(_stub(channel))
        return self._fan_out("Describe", [(i, bank_pb2.DescribeRequest()) for i in range(first, len(self._stubs))])

    def _channel(self, address: str) -> grpc.Channel:
        if self._credentials:
            return grpc.secure_channel(address, self._credentials, options=self._options)
        return grpc.insecure_channel(address, options=self._options)

    def _find_again(self, shard: int, deadline: float) -> None:
        """Ask `resolve` where an unreachable shard is now, and reconnect if it moved.
        A resolver that fails is logged; the retry loop goes on until the deadline."""
        if self._resolve is None or shard >= len(self._stubs):
            return
        try:
            address = self._resolve(shard, max(deadline - time.monotonic(), 0.001))
        except Exception as error:  # the resolver's own failure must not hide the shard's
            log.warning("could not find bank shard %d again (%s); retrying %s", shard, error, self._addresses[shard])
            return
        with self._moved:  # a BankFeed thread and the caller's may both find it
            if address == self._addresses[shard]:
                return
            log.info("bank shard %d moved from %s to %s", shard, self._addresses[shard], address)
            self._retired.append(self._channels[shard])
            self._channels[shard] = self._channel(address)
            self._stubs[shard] = _stub(self._channels[shard])
            self._addresses[shard] = address

    @property
    def addresses(self) -> list[str]:
        """Addresses in shard order."""
        return list(self._addresses)

    def _check_layout(self, infos) -> None:
        where = [
            f"{a} (shard {d.shard_id} of {d.num_shards}, N={d.total_rows}, D={d.dim}, {bank_pb2.DType.Name(d.dtype)})"
            for a, d in zip(self._addresses, infos)
        ]
        for field in ("num_shards", "total_rows", "dim", "dtype"):
            if len({getattr(d, field) for d in infos}) > 1:
                raise LayoutError(f"shards disagree on {field}: " + "; ".join(where))
        s = infos[0].num_shards
        if len(infos) != s:
            raise LayoutError(f"the bank has {s} shard(s) but {len(infos)} address(es) were given: " + "; ".join(where))
        ids = sorted(d.shard_id for d in infos)
        if ids != list(range(s)):
            missing = sorted(set(range(s)) - set(ids))
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise LayoutError(
                f"shard ids must be 0..{s - 1} once each; missing {missing}, repeated {dupes}: " + "; ".join(where)
            )

    # -- transport --------------------------------------------------------------

    def _fan_out(self, method: str, calls: list[tuple[int, Any]]) -> list:
        """Issue every (shard, request) at once; answers in the same order.

        UNAVAILABLE is retried with backoff until the deadline; anything else raises.
        """
        deadline = time.monotonic() + self.timeout
        answers: list = [None] * len(calls)
        pending = list(range(len(calls)))
        backoff = _FIRST_BACKOFF_S
        while pending:
            # All but the last go out on the client's threads; the last is a blocking call
            # on this one, made while they run. (A gRPC future starts a thread of its own
            # whenever its channel has no other call in flight: every Step, here.)
            *others, last = pending
            started = [(i, self._calls.submit(self._call, method, *calls[i], deadline)) for i in others]
            inflight = [(last, None), *started]  # None: this thread's call, made in the loop
            retry, failures = [], {}
            outages = self._outages
            for i, running in inflight:
                try:
                    answers[i] = self._call(method, *calls[i], deadline) if running is None else running.result()
                    if outages is not None:
                        outages.answered(calls[i][0])
                except grpc.RpcError as error:
                    unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
                    if unavailable and outages is not None:
                        outages.failed(calls[i][0], self._addresses[calls[i][0]], error.code().name)
                    if unavailable and time.monotonic() + backoff < deadline:
                        self._find_again(calls[i][0], deadline)
                        retry.append(i)
                    else:
                        kind = RequestRejected if error.code() == grpc.StatusCode.INVALID_ARGUMENT else BankRpcError
                        failures[i] = kind(error.code(), error.details() or "", self._addresses[calls[i][0]])
            if failures:  # the first call's, whatever order the answers came in
                raise failures[min(failures)]
            pending = sorted(retry)
            if pending:
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return answers

    def _call(self, method: str, shard: int, request, deadline: float):
        stub = self._stubs[shard]  # read now: a shard found again has a new one
        return getattr(stub, method)(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata)

    def _route(self, indices: np.ndarray) -> list[np.ndarray]:
        """Positions in `indices` that each shard owns (out-of-range ones are left to
        the shards to reject, so the error names the field)."""
        if self.num_shards == 1:  # no sort to find them
            return [np.arange(len(indices))]
        shard = np.mod(indices, self.num_shards)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(self.num_shards + 1))
        return [order[bounds[s] : bounds[s + 1]] for s in range(self.num_shards)]

    def _chunks(self, positions: np.ndarray, bytes_per_item: int) -> list[np.ndarray]:
        per = max(1, self.chunk_bytes // max(bytes_per_item, 1))
        return [positions[i : i + per] for i in range(0, len(positions), per)] or []

    @staticmethod
    def _indices(indices, field: str = "indices") -> np.ndarray:
        return validate.integers(np.asarray(indices), field).astype(np.int64, copy=False)

    # -- the bank ---------------------------------------------------------------

    def describe(self) -> list[dict]:
        answers = self._fan_out("Describe", [(s, bank_pb2.DescribeRequest()) for s in range(self.num_shards)])
        return [
            {
                "address": a,
                "shard_id": d.shard_id,
                "num_shards": d.num_shards,
                "total_rows": d.total_rows,
                "dim": d.dim,
                "dtype": np.dtype(tensors.NUMPY_DTYPES[d.dtype]).name,
                "rows_held": d.rows_held,
                "updates_applied": d.updates_applied,
                "rows_updated": d.rows_updated,
                "last_snapshot_tag": d.last_snapshot_tag,
            }
            for a, d in zip(self._addresses, answers)
        ]

    def lookup(self, indices):
        """Rows (n, D) of global `indices`, in their order."""
        idx = self._indices(indices)
        calls, places = [], []
        for s, positions in enumerate(self._route(idx)):
            for chunk in self._chunks(positions, self._row_bytes):
                calls.append((s, bank_pb2.LookupRequest(indices=tensors.encode(idx[chunk]))))
                places.append(chunk)
        rows = np.empty((len(idx), self.dim), dtype=self.dtype)
        for chunk, answer in zip(places, self._fan_out("Lookup", calls)):
            rows[chunk] = tensors.decode(wire.parse_lookup_response(answer).rows, "rows")
        return rows

    def sample(self, k: int, seed: int | None = None):
        """k rows drawn uniformly with replacement over all N rows: (indices, rows)."""
        validate.count(k, 1, self.rows, "k", "the bank's rows")
        rng = self._rng if seed is None else np.random.default_rng(seed)
        places = negative_places(k, self.rows, self.num_shards, rng)
        per = max(1, self.chunk_bytes // (self._row_bytes + 8))  # draws whose answer fits a message
        calls = [
            (s, bank_pb2.SampleRequest(k=min(per, share - begin), seed=_shard_seed(rng, seed)))
            for s, share in enumerate(_shares(k, places))
            for begin in range(0, share, per)
        ]
        draws: dict[int, list] = {}
        for (s, _), answer in zip(calls, self._fan_out("Sample", calls)):
            answer = wire.parse_sample_response(answer)
            draws.setdefault(s, []).append(
                (tensors.decode(answer.indices, "indices"), tensors.decode(answer.rows, "rows"))
            )
        return placed_draws(k, places, draws, self._addresses, self.dim, self.dtype)

    @staticmethod
    def _floats(values) -> np.ndarray:
        """float16 stays; every other dtype travels as float32."""
        array = np.asarray(values)
        if array.dtype not in (np.float16, np.float32):
            array = array.astype(np.float32)
        return array

    def _checked_update(self, indices, features, momentum: float, whole: bool = False) -> tuple[np.ndarray, np.ndarray]:
        idx, features = self._indices(indices, "update.indices"), self._floats(features)
        # The shards validate only their own parts: a bad row in one must not let the
        # others apply theirs, so the update is checked whole before any part goes out.
        # One shard checks all of it itself, with the same validators.
        if self.num_shards > 1 or whole:
            validate.update(idx, features, momentum, self.rows, self.dim)
        return idx, features

    def _update_message(self, idx: np.ndarray, features: np.ndarray, momentum: float) -> bank_pb2.UpdateRequest:
        """One message of an update, with a sequence number of its own."""
        return bank_pb2.UpdateRequest(
            indices=tensors.encode(idx),
            features=tensors.encode(features),
            momentum=momentum,
            client_id=self.client_id,
            sequence=next(self._sequence),
        )

    def update(self, indices, features, momentum: float = 0.5) -> int:
        """``v_i <- normalize(m v_i + (1 - m) f_i)``; returns how many requests were
        applied (a retried one that already landed counts zero)."""
        idx, features = self._checked_update(indices, features, momentum)
        item_bytes = self.dim * features.dtype.itemsize + 8
        calls = [
            (s, self._update_message(idx[chunk], features[chunk], momentum))
            for s, positions in enumerate(self._route(idx))
            for chunk in self._chunks(positions, item_bytes)
        ]
        return sum(a.applied for a in self._fan_out("Update", calls))

    def check_step(self, updates: int, lookups: int, negatives: int) -> None:
        """InvalidArgument, naming the sizes and how to raise the limit, if a Step of
        `updates` rows written, `lookups` read and `negatives` drawn might not fit in a
        message to one shard (however they fall on the shards)."""
        need = step_message_bytes(updates, lookups, negatives, self.dim, self.dtype)
        if need > self.max_message_bytes:
            raise InvalidArgument(
                f"a Step of {updates} update(s), {lookups} lookup(s) and {negatives} negative(s) of {self.dim} x "
                f"{self.dtype} may need a message of {need} bytes, over the bank's limit of "
                f"{self.max_message_bytes} bytes: start the shards with --max-message-mb "
                f"{math.ceil(need / _MIB)} or more (start_bank's max_message_bytes), or use a smaller batch or "
                "fewer negatives"
            )

    def checked_step(
        self, update_indices, update_features, momentum: float, lookup_indices, negatives: int, whole: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """A Step's (update indices, update features, lookup indices) as arrays, None where
        absent, checked before anything is sent: sizes always, values when the Step goes
        to several shards or `whole` (a shard checks its own part with the same
        validators, so a mistake reads the same wherever it is caught)."""
        validate.count(negatives, 0, self.rows, "negatives", "the bank's rows")
        idx = features = reads = None
        if update_indices is not None and len(update_indices):
            idx, features = self._checked_update(update_indices, update_features, momentum, whole)
        if lookup_indices is not None:
            reads = self._indices(lookup_indices, "lookup_indices")
            # Likewise: a shard refusing its part of the reads would refuse its part of
            # the update too, while the others apply theirs.
            if self.num_shards > 1 or whole:
                validate.indices(reads, self.rows, "lookup_indices")
        self.check_step(0 if idx is None else len(idx), 0 if reads is None else len(reads), negatives)
        return idx, features, reads

    def step(
        self,
        update_indices=None,
        update_features=None,
        momentum: float = 0.5,
        lookup_indices=None,
        negatives: int = 0,
        seed: int | None = None,
    ) -> StepResult:
        """One round trip, one message per shard: apply an update, then read
        `lookup_indices` and `negatives` uniform rows. A Step that might not fit in a
        message is refused before anything is sent (`check_step`)."""
        idx, features, reads = self.checked_step(update_indices, update_features, momentum, lookup_indices, negatives)
        n_lookup = 0 if reads is None else len(reads)
        rng = self._rng if seed is None else np.random.default_rng(seed)

        fields: dict[int, dict[str, Any]] = {}  # shard -> its StepRequest's fields
        if idx is not None:
            for s, at in enumerate(self._route(idx)):
                if len(at):
                    fields.setdefault(s, {})["update"] = self._update_message(idx[at], features[at], momentum)
        lookups: dict[int, np.ndarray] = {}  # shard -> positions in lookup_indices
        if reads is not None:
            for s, at in enumerate(self._route(reads)):
                if len(at):
                    lookups[s] = at
                    fields.setdefault(s, {})["lookup_indices"] = tensors.encode(reads[at])
        if negatives:
            places = negative_places(negatives, self.rows, self.num_shards, rng)
            for s, share in enumerate(_shares(negatives, places)):
                if share:
                    fields.setdefault(s, {}).update(sample_k=share, sample_seed=_shard_seed(rng, seed))

        shards = sorted(fields)
        answers = self._fan_out("Step", [(s, bank_pb2.StepRequest(**fields[s])) for s in shards])
        rows = np.empty((n_lookup, self.dim), dtype=self.dtype)
        draws: dict[int, list] = {}
        applied = 0
        for s, answer in zip(shards, answers):
            answer = wire.parse_step_response(answer)
            applied += answer.update_applied
            if s in lookups:
                rows[lookups[s]] = tensors.decode(answer.rows, "rows")
            if answer.sample_indices is not None:
                draws[s] = [
                    (
                        tensors.decode(answer.sample_indices, "sample_indices"),
                        tensors.decode(answer.sample_rows, "sample_rows"),
                    )
                ]
        if negatives:
            neg_i, neg_r = placed_draws(negatives, places, draws, self._addresses, self.dim, self.dtype)
        else:
            neg_i = np.empty(0, dtype=np.int64)
            neg_r = np.empty((0, self.dim), dtype=self.dtype)
        return StepResult(rows, neg_i, neg_r, applied)

    def partition_sums(self, queries, temperature: float):
        """``(log Z, E_p[v])`` per query over all N rows, with ``Z = sum_j exp(v_j . q / tau)``
        and ``E_p[v] = sum_j softmax_j v_j`` (so ``d log Z / d q = E_p[v] / tau``)."""
        q = self._floats(queries)
        positions = np.arange(len(q))
        chunks = self._chunks(positions, (self.dim + 2) * 4)
        calls = [
            (s, bank_pb2.PartitionSumRequest(queries=tensors.encode(q[c]), temperature=temperature))
            for c in chunks
            for s in range(self.num_shards)
        ]
        answers = iter(self._fan_out("PartitionSum", calls))
        log_z = np.empty(len(q), dtype=np.float64)
        expected = np.empty((len(q), self.dim), dtype=np.float32)
        for c in chunks:
            parts = [next(answers) for _ in range(self.num_shards)]
            log_z[c], expected[c] = merge_partition_sums(
                [tensors.decode(p.max_logit, "max_logit") for p in parts],
                [tensors.decode(p.sum_exp, "sum_exp") for p in parts],
                [tensors.decode(p.weighted_sum, "weighted_sum") for p in parts],
            )
        return log_z, expected

    def topk(self, queries, k: int):
        """The k most cosine-similar bank rows per query: (similarities (B, k)
        descending, global indices (B, k))."""
        validate.count(k, 1, self.rows, "k", "the bank's rows")
        q = self._floats(queries)
        shard_k = [int(min(k, n)) for n in self.shard_rows]
        chunks = self._chunks(np.arange(len(q)), max(shard_k) * 12)
        calls = [
            (s, bank_pb2.TopKRequest(queries=tensors.encode(q[c]), k=shard_k[s]))
            for c in chunks
            for s in range(self.num_shards)
        ]
        answers = iter(self._fan_out("TopK", calls))
        sims = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for c in chunks:
            parts = [next(answers) for _ in range(self.num_shards)]
            sims[c], idx[c] = merge_topk(
                [tensors.decode(p.similarities, "similarities") for p in parts],
                [tensors.decode(p.indices, "indices") for p in parts],
                k,
            )
        return sims, idx

    def snapshot(self, tag: str) -> list[dict]:
        """Every shard writes snapshot `tag`; one dict per shard (path, bytes, seconds)."""
        answers = self._fan_out("Snapshot", [(s, bank_pb2.SnapshotRequest(tag=tag)) for s in range(self.num_shards)])
        return [{"path": a.path, "bytes": a.bytes, "seconds": a.seconds} for a in answers]

    def restore(self, tag: str = "") -> list[dict]:
        """Every shard reloads snapshot `tag` (default: its newest)."""
        answers = self._fan_out("Restore", [(s, bank_pb2.RestoreRequest(tag=tag)) for s in range(self.num_shards)])
        return [{"tag": a.tag, "path": a.path} for a in answers]

    def close(self) -> None:
        for channel in self._channels + self._retired:
            channel.close()  # ends the calls in flight, so the threads' wait is short
        self._calls.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
