"""The simulated music platform: SimPy sessions that ask a recommender for slates and react.

Processes (simulated time is in milliseconds since `config.start_ts`):
- arrivals (user model 1): walks the session start times drawn up front (users.py) and
  starts each session one batch window early, unless that user is still in a session (a
  listener has one session at a time, so a user's events never interleave and their
  timestamps grow);
- listener (user model 2), one per user: waits for the user's next start (returns.py), runs
  the session, and draws the next start from how satisfying it was;
- session: picks a scenario from the user's mix, then asks for slates until satisfaction
  runs out; with P `scenario_switch` the next slate is from another scenario. Library and
  radio need a library (radio seeds from it), else the session opens the home feed;
- batcher: every `batch_window_ms` (the tick) it takes all queued requests, calls
  `recommender.recommend` once for the ranked ones, builds the library slates, reacts to
  all slates together (reactions.py) and tells each session when its slate is shown, how
  long the user spends on it and whether they want more.

Prefetch, the reason ranking can be batched at all: with 2,000 users a request arrives
every few seconds, so batching over a realistic 50 ms would mean batches of one. Instead,
like a player queueing the next tracks, a session requests its next slate one tick before
the current slate runs out, and the slate is shown exactly when the user gets to it (at
the next tick if the previous slate was shorter than a tick). So users do not wait, a
recommend call carries many requests, and the ranker sees the user's history up to the
request: it misses at most the last tick of listening (about the last track).

Events are emitted when they happen: a slate's reaction is computed when it is ranked, but
its events wait in a buffer and go to the sink at the first tick at or after their
timestamp, sorted by time, one `EventBatch` per tick. Everything generated later has a
later timestamp, so the log is in time order, event_id grows with ts, and features built
from it never see the future. Events of slates begun before the end of the horizon are
all emitted, so the log runs a little past `config.days`.

Determinism: one `np.random.Generator` from `config.seed` drives everything. SimPy orders
simultaneous events by scheduling order, scalar draws come from a buffered stream of the
same generator, and there is no wall clock or `hash()`: a seed fixes the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import simpy

from ranker.interface import RankResponse, Recommender, SlateRequest
from simulator.catalog import Catalog
from simulator.config import DAY_MS, HOUR_MS, SimConfig
from simulator.oracle import Oracle
from simulator.reactions import EVENT_COLUMNS, ReactionModel, Slates
from simulator.returns import ReturnModel
from simulator.tastes import choose_interest, generate_interests
from simulator.users import Users
from streaming.events import SCENARIOS, EventBatch

HOME, RADIO, SEARCH, LIBRARY = (SCENARIOS.index(s) for s in ("home_feed", "radio", "search", "library"))


@dataclass(frozen=True)
class SimSummary:
    events: int
    sessions: int
    requests: int  # slate requests sent to the recommender (library slates are not requests)
    recommend_calls: int
    library_slates: int
    simulated_seconds: float

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.recommend_calls if self.recommend_calls else 0.0


class UniformStream:
    """Scalar uniforms drawn from the shared generator in chunks (a call per draw is slow)."""

    def __init__(self, rng: np.random.Generator, chunk: int = 4096) -> None:
        self.rng, self.chunk = rng, chunk
        self.buffer: list[float] = []
        self.index = 0

    def __call__(self) -> float:
        if self.index == len(self.buffer):
            self.buffer, self.index = self.rng.random(self.chunk).tolist(), 0
        self.index += 1
        return self.buffer[self.index - 1]


@dataclass
class _Ask:
    """A slate a session waits for; `done` gets (shown_at ms, duration_ms, keep_going,
    satisfaction sum, items examined)."""

    user: int
    scenario: int
    slate_index: int
    show_at: int  # simulated ms the user will look at the slate (end of the previous one)
    query_genre: int
    seed_track: int
    request: SlateRequest | None  # None for a library slate
    done: simpy.Event


class MusicPlatform:
    def __init__(self, config: SimConfig, recommender: Recommender | None,
                 sink: Callable[[EventBatch], None], arms: np.ndarray | None = None) -> None:
        self.config = config
        self.recommender = recommender  # may be set after construction, before run()
        self.sink = sink
        # Optional: gets (request_ids, track_ids, engagement) of every ranked impression, the
        # oracle's P(full play | examined) when it was shown: the ceiling for offline evaluation.
        self.oracle_sink: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
        self.rng = np.random.default_rng(config.seed)
        self.uniform = UniformStream(self.rng)
        self.catalog = Catalog.generate(config, self.rng)
        self.users = Users.generate(config, self.catalog, self.rng)
        self.oracle = Oracle(config, self.catalog, self.users)
        self.reactions = ReactionModel(config, self.catalog, self.users, self.oracle)
        # User model 2 draws each return from satisfaction (returns.py); model 1 draws all starts up front.
        self.returns = ReturnModel(config, self.users.sessions_per_day, self.rng) if config.user_model >= 2 else None
        if self.returns is not None:
            generate_interests(self.users, config, self.catalog, self.rng)
        if self.catalog.albums is not None:  # model 3
            self.users.album_next = np.full(config.n_users, -1, np.int64)
        self.arms = self._check_arms(arms, config.n_users)
        self.slate_size = np.array([config.scenario(s).slate_size for s in SCENARIOS])

        self.env = simpy.Environment()
        self.busy_until = np.full(config.n_users, -np.inf)  # ms a user's session ends; inf while unknown
        self.queue: list[_Ask] = []
        self.pending = np.zeros((0, len(EVENT_COLUMNS)), np.int64)  # generated, not yet emitted
        self.pending_first_ts = np.inf
        self.next_event_id = 0
        self.next_request_id = 0
        self.sessions = self.requests = self.recommend_calls = self.library_slates = 0
        self.started = False

    @staticmethod
    def _check_arms(arms: np.ndarray | None, n_users: int) -> np.ndarray:
        if arms is None:
            return np.full(n_users, "control", dtype=object)
        arms = np.asarray(arms, dtype=object)
        if arms.shape != (n_users,):
            raise ValueError(f"arms: expected one arm per user, shape ({n_users},), got {arms.shape}")
        if not all(isinstance(a, str) and 0 < len(a) <= 64 for a in arms.tolist()):
            raise ValueError("arms: every arm must be a non-empty string of at most 64 characters")
        return arms

    @property
    def now_ts(self) -> int:
        """Current simulated epoch ms."""
        return self.config.start_ts + int(self.env.now)

    def run(self, progress: Callable[[float], None] | None = None,
            pauses: Sequence[tuple[int, Callable[[], None]]] = ()) -> SimSummary:
        """Simulate `config.days`; events go to the sink as they happen. One run per platform.

        `pauses`: (simulated ms since start, callback) pairs. The clock stops at each and the
        callback runs before time goes on (an experiment trains its models there, on the log
        so far, and swaps the recommender's rankers); nothing random is drawn in between, so
        pausing alone does not change the event log."""
        if self.recommender is None:
            raise ValueError("recommender: set a Recommender before run()")
        if self.started:
            raise RuntimeError("run: a MusicPlatform simulates once; build a new one for another run")
        self.started = True
        self.reactions.record_engagement = self.oracle_sink is not None
        horizon = self.config.horizon_ms
        if self.returns is None:
            starts, users = self.users.session_starts(self.config, self.rng)
            self.env.process(self._arrivals(starts.tolist(), users.tolist()))
        else:
            for user in range(self.config.n_users):
                self.env.process(self._listener(user))
        self.env.process(self._batcher())
        if progress is not None:
            self.env.process(self._progress(progress, horizon))
        for at, callback in sorted(pauses, key=lambda pause: pause[0]):
            if not 0 < at < horizon:
                raise ValueError(f"pauses: {at} ms is not inside the horizon (0, {horizon})")
            self.env.run(until=at)
            callback()
        self.env.run(until=horizon)
        self._emit(np.iinfo(np.int64).max)  # listening that began before the end finishes
        if progress is not None:
            progress(1.0)
        return SimSummary(events=self.next_event_id, sessions=self.sessions, requests=self.requests,
                          recommend_calls=self.recommend_calls, library_slates=self.library_slates,
                          simulated_seconds=horizon / 1000)

    # ---- processes -----------------------------------------------------------------------

    def _arrivals(self, starts: list[int], users: list[int]):
        """Start sessions one batch window early, so the first slate is ranked by the time the app opens."""
        env, lead = self.env, self.config.batch_window_ms
        for start, user in zip(starts, users):
            if start - lead > env.now:
                yield env.timeout(start - lead - env.now)
            if self.busy_until[user] > start:
                continue
            self.busy_until[user] = np.inf
            self.sessions += 1
            env.process(self._session(user, start))

    def _listener(self, user: int):
        """One user's life (user model 2): sessions, each followed by the draw of the next start."""
        env, lead, returns = self.env, self.config.batch_window_ms, self.returns
        start = returns.next_start(user, 0, self.uniform)
        while start is not None:
            if start - lead > env.now:
                yield env.timeout(start - lead - env.now)
            self.sessions += 1
            self.busy_until[user] = np.inf
            end, satisfaction = yield from self._session(user, max(start, int(env.now)))
            start = returns.end_session(user, end, satisfaction, self.uniform)

    def _session(self, user: int, show_at: int):
        """Slates back to back; the next one is requested a batch window before the current one ends.

        Returns (end ms, satisfaction per examined item over the session)."""
        users, config, env = self.users, self.config, self.env
        elapsed_days = (show_at - users.last_walk_ms[user]) / DAY_MS
        users.begin_session(user, show_at, config, self.rng)
        scenario = users.draw_scenario(user, self.uniform())
        if self.returns is not None:
            choose_interest(users, user, scenario, show_at, elapsed_days, config, self.catalog, self.rng, self.uniform)
        satisfied = examined = 0.0
        for slate_index in range(config.max_slates_per_session):
            ask = self._ask(user, scenario, slate_index, show_at)
            shown_at, duration_ms, keep_going, slate_satisfied, slate_examined = yield ask.done
            show_at = shown_at + duration_ms
            satisfied += slate_satisfied
            examined += slate_examined
            if not keep_going:
                break
            if self.uniform() < config.scenario_switch:
                scenario = users.draw_scenario(user, self.uniform())
            wake = show_at - config.batch_window_ms
            if wake > env.now:
                yield env.timeout(wake - env.now)
        self.busy_until[user] = show_at
        return show_at, satisfied / max(examined, 1.0)

    def _batcher(self):
        env, window = self.env, self.config.batch_window_ms
        while True:
            yield env.timeout(window)
            if self.queue:
                self._flush()
            if self.pending_first_ts <= self.now_ts:
                self._emit(self.now_ts)

    def _progress(self, progress: Callable[[float], None], horizon: int):
        step = max(HOUR_MS, horizon // 200)
        while True:
            yield self.env.timeout(step)
            progress(min(1.0, self.env.now / horizon))

    # ---- requests ------------------------------------------------------------------------

    def _ask(self, user: int, scenario: int, slate_index: int, show_at: int) -> _Ask:
        """Queue a slate for the next batch; radio and library fall back to home without a library."""
        users, query_genre, seed_track = self.users, -1, -1
        if scenario in (RADIO, LIBRARY) and users.library_count[user] == 0:
            scenario = HOME
        if scenario == RADIO:
            seed_track = users.draw_library_track(user, self.uniform())
        elif scenario == SEARCH:
            query_genre = users.draw_query_genre(user, self.catalog, self.uniform())
        request = None
        if scenario != LIBRARY:
            context = {"seed_track": seed_track} if seed_track >= 0 else (
                {"query_genre": query_genre} if query_genre >= 0 else {})
            request = SlateRequest(request_id=self.next_request_id, user_id=user, scenario=SCENARIOS[scenario],
                                   ts=self.now_ts, slate_size=int(self.slate_size[scenario]), context=context)
            self.next_request_id += 1
        ask = _Ask(user, scenario, slate_index, show_at, query_genre, seed_track, request, self.env.event())
        self.queue.append(ask)
        return ask

    def _flush(self) -> None:
        asks, self.queue = self.queue, []
        self.users.now_ms = int(self.env.now)
        requests = [a.request for a in asks if a.request is not None]
        responses = self._recommend(requests) if requests else []
        slates = self._slates(asks, responses)
        shown_at = slates.shown_at - self.config.start_ts
        outcome = self.reactions.react(slates, self.rng)
        if self.oracle_sink is not None:
            shown = slates.mask & (slates.request_id >= 0)[:, None]
            rows = np.nonzero(shown)[0]
            self.oracle_sink(slates.request_id[rows], slates.tracks[shown], outcome.engagement[shown])
        if len(outcome.events):
            self.pending = np.concatenate([self.pending, outcome.events]) if len(self.pending) else outcome.events
            self.pending_first_ts = min(self.pending_first_ts, int(outcome.events[:, 0].min()))
        for ask, shown, duration_ms, keep_going, satisfied, examined in zip(
                asks, shown_at.tolist(), outcome.duration_ms.tolist(), outcome.keep_going.tolist(),
                outcome.satisfied.tolist(), outcome.examined.tolist()):
            ask.done.succeed((shown, duration_ms, keep_going, satisfied, examined))

    def _recommend(self, requests: list[SlateRequest]) -> list[RankResponse]:
        responses = self.recommender.recommend(requests)
        self.recommend_calls += 1
        self.requests += len(requests)
        if len(responses) != len(requests):
            raise ValueError(f"recommender: {len(requests)} requests got {len(responses)} responses")
        for request, response in zip(requests, responses):
            if response.request_id != request.request_id:
                raise ValueError(f"recommender: response for request {response.request_id} came where "
                                 f"request {request.request_id} was expected (responses must keep request order)")
        return responses

    def _slates(self, asks: list[_Ask], responses: list[RankResponse]) -> Slates:
        """The tick's slates as arrays: ranked ones from the responses, library ones picked here.

        A slate is shown when the user gets to it, or now if its request came late."""
        R = len(asks)
        table = np.array([(a.user, a.scenario, a.query_genre, a.seed_track, a.slate_index, a.show_at,
                           a.request.request_id if a.request else -1) for a in asks], dtype=np.int64)
        users, scenario, query_genre, seed_track, slate_index, show_at, request_id = table.T
        shown_at = np.maximum(show_at, int(self.env.now)) + self.config.start_ts
        sizes = self.slate_size[scenario]
        tracks = np.zeros((R, int(sizes.max())), np.int64)
        lengths = np.zeros(R, np.int64)
        organic = request_id < 0
        ranked_rows = np.flatnonzero(~organic).tolist()
        for row, response, size in zip(ranked_rows, responses, sizes[ranked_rows].tolist()):
            shown = response.candidates[response.order[:size]]  # = ranked_tracks[:size], gathering only those
            tracks[row, :len(shown)] = shown
            lengths[row] = len(shown)
        if organic.any():
            self._library_slates(np.flatnonzero(organic), users[organic], tracks, lengths)
        mask = np.arange(tracks.shape[1]) < lengths[:, None]
        self._check_shown(request_id, tracks, mask, shown_at)
        return Slates(users=users, scenario=scenario, query_genre=query_genre, seed_track=seed_track,
                      request_id=request_id, shown_at=shown_at, slate_index=slate_index, tracks=tracks, mask=mask)

    def _library_slates(self, rows: np.ndarray, users: np.ndarray, tracks: np.ndarray, lengths: np.ndarray) -> None:
        """Organic plays: the user picks tracks from their own library (repeats allowed)."""
        k = int(self.slate_size[LIBRARY])
        count = self.users.library_count[users][:, None]
        u = self.rng.random((len(rows), k))
        if self.returns is None:
            pick = (u * count).astype(np.int64)
        else:  # model 2: recently added tracks come back most (slot next-1 is the newest)
            back = np.minimum((u ** 2.5 * count).astype(np.int64), count - 1)
            newest = (self.users.library_next[users][:, None] - 1) % self.users.library.shape[1]
            pick = np.where(count < self.users.library.shape[1], count - 1 - back, (newest - back) % self.users.library.shape[1])
        picked = self.users.library[users[:, None], pick]
        albums = self.catalog.albums
        if albums is not None:  # model 3: go on with the album in progress, or put one on (albums.py)
            config, in_progress = self.config, self.users.album_next[users]
            puts_on, goes_on = self.rng.random(len(rows)), self.rng.random((len(rows), k)) < config.album_continue
            continuing = in_progress >= 0
            start = np.where(continuing, in_progress, albums.first_track[picked[:, 0]])
            on = np.where(continuing, goes_on[:, 0], puts_on < config.album_listen_share)
            album_tracks, playing = albums.listen(start, on, goes_on)
            picked = np.where(playing, album_tracks, picked)
        tracks[rows, :k] = picked
        lengths[rows] = k
        self.library_slates += len(rows)

    def _check_shown(self, request_id: np.ndarray, tracks: np.ndarray, mask: np.ndarray, shown_at: np.ndarray) -> None:
        catalog = self.catalog
        bad_id = mask & ((tracks < 0) | (tracks >= catalog.n_tracks))
        if bad_id.any():
            row = int(np.flatnonzero(bad_id.any(axis=1))[0])
            raise ValueError(f"recommender: request {request_id[row]} got track ids outside "
                             f"[0, {catalog.n_tracks}): {tracks[row][bad_id[row]].tolist()}")
        unreleased = mask & (catalog.release_ts[np.where(mask, tracks, 0)] > shown_at[:, None])
        if unreleased.any():
            row = int(np.flatnonzero(unreleased.any(axis=1))[0])
            raise ValueError(f"recommender: request {request_id[row]} served tracks not yet "
                             f"released at ts={shown_at[row]}: {tracks[row][unreleased[row]].tolist()}")

    # ---- events --------------------------------------------------------------------------

    def _emit(self, up_to_ts: int) -> None:
        """Send every buffered event with ts <= up_to_ts to the sink, in time order."""
        if not len(self.pending):
            return
        ready = self.pending[:, 0] <= up_to_ts
        if not ready.any():
            return
        out = self.pending[ready]
        out = out[np.argsort(out[:, 0], kind="stable")]
        self.pending = self.pending[~ready]
        self.pending_first_ts = int(self.pending[:, 0].min()) if len(self.pending) else np.inf
        n = len(out)
        event_id = np.arange(self.next_event_id, self.next_event_id + n, dtype=np.int64)
        self.next_event_id += n
        columns = {name: out[:, i] for i, name in enumerate(EVENT_COLUMNS)}
        self.sink(EventBatch.from_columns(event_id=event_id, arm=self.arms[columns["user_id"]], **columns))
