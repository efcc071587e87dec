"""Albums (user model 3): an artist's tracks grouped into albums, and album listens in order.

Catalogue. Each artist's back-catalogue tracks (released before the run), in order of release,
are cut into albums whose sizes are lognormal around `album_size_median` (12: the mean track
count of 470 albums with over 5 million sales, most of them 10-14 tracks, Knight Music's
analysis of Chart Masters' list; Billboard's 2009 samples of streamed albums averaged 12.5 and
just under 14 tracks), clipped to [`album_size_min`, `album_size_max`] = [7, 18] (a
distributor's definition of an album; fewer tracks make an EP or a single). What is left of an
artist's tracks after its last full album is its EP or single, so small artists have EPs and
singles. Tracks released during the run come out as singles. Within an album, tracks are
numbered in order of release.

Listening. A library slate puts on an album with P `album_listen_share` (ours): the album of
the user's first library pick, from its first track, in order; each next track follows with P
`album_continue` (0.9: Billboard 2009 found 58% of an album-centric service's listeners still
there at track 5 and 36% at track 13, 0.87-0.92 a track); where the listen stops, the slate
goes on with library picks. A session that fully played an album track last has that album in
progress (`Users.album_next`): its next library slate continues it with P `album_continue`,
and in a ranked slate the album's next track gets `album_continuation` (ours) on both logits
(oracle.py), so a ranker that reads the session's last track can continue the album too.

Albums come from their own generator (seeded by the config's seed), so model 3's catalogue is
model 2's with albums added, and models 1 and 2 draw nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALBUM_RNG_KEY = 3  # albums draw from default_rng((seed, ALBUM_RNG_KEY)): the main stream is untouched


@dataclass(frozen=True)
class Albums:
    album_id: np.ndarray  # int64 [T]
    track_number: np.ndarray  # int64 [T], 0 for an album's first track
    size: np.ndarray  # int64 [T], tracks on this track's album
    order: np.ndarray  # int64 [T], track ids by (album, track number)
    rank: np.ndarray  # int64 [T], each track's index in `order`
    next_track: np.ndarray  # int64 [T], the album's next track, -1 after its last
    first_track: np.ndarray  # int64 [T], the first track of this track's album

    @classmethod
    def generate(cls, artist_id: np.ndarray, release_ts: np.ndarray, start_ts: int, config,
                 rng: np.random.Generator) -> "Albums":
        T = len(artist_id)
        back = release_ts <= start_ts
        album = np.empty(T, np.int64)
        number = np.zeros(T, np.int64)
        # Back catalogue, by artist then release: rank of each track within its artist.
        tracks = np.flatnonzero(back)
        tracks = tracks[np.lexsort((tracks, release_ts[tracks], artist_id[tracks]))]
        n_back = 0
        if len(tracks):
            artist = artist_id[tracks]
            first = np.flatnonzero(np.r_[True, artist[1:] != artist[:-1]])  # [A'] first row of each artist
            counts = np.diff(np.r_[first, len(tracks)])
            segment = np.repeat(np.arange(len(first)), counts)  # artist index of each row
            rank = np.arange(len(tracks)) - first[segment]
            # Enough album sizes per artist to cover its tracks; an artist's albums end at `boundary`.
            draws = -(-counts // config.album_size_min)
            sizes = np.clip(np.rint(config.album_size_median
                                    * np.exp(config.album_size_sigma * rng.standard_normal(int(draws.sum())))),
                            config.album_size_min, config.album_size_max).astype(np.int64)
            draw_segment = np.repeat(np.arange(len(first)), draws)
            cumulative = np.cumsum(sizes)
            before = np.r_[0, cumulative][np.r_[0, np.cumsum(draws)[:-1]]][draw_segment]
            boundary = cumulative - before  # end (exclusive) of each drawn album within its artist
            span = int(boundary.max()) + 1  # keys sort by (artist, boundary)
            drawn = np.searchsorted(draw_segment * span + boundary, segment * span + rank, side="right")
            used, album[tracks] = np.unique(drawn, return_inverse=True)
            number[tracks] = rank - (boundary[drawn] - sizes[drawn])
            n_back = len(used)
        new = np.flatnonzero(~back)  # released during the run: singles
        album[new] = n_back + np.arange(len(new))
        size = np.bincount(album)[album]
        order = np.lexsort((number, album))
        rank_in_order = np.empty(T, np.int64)
        rank_in_order[order] = np.arange(T)
        has_next = number + 1 < size
        next_track = np.where(has_next, order[np.minimum(rank_in_order + 1, T - 1)], -1)
        return cls(album_id=album, track_number=number, size=size, order=order, rank=rank_in_order,
                   next_track=next_track, first_track=order[rank_in_order - number])

    def listen(self, start: np.ndarray, on: np.ndarray, goes_on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Album listens from `start` [n] (a track id) where `on` [n]: the album's tracks in order,
        each next one while `goes_on` [n, k] holds (column 0 is not read) and the album lasts.

        Returns (tracks [n, k], playing [n, k]); tracks are only meaningful where playing."""
        n, k = goes_on.shape
        step = np.arange(k)
        tracks = self.order[np.minimum(self.rank[start][:, None] + step, len(self.order) - 1)]
        left = (self.size[start] - self.track_number[start])[:, None]
        still = np.logical_and.accumulate(np.concatenate([np.ones((n, 1), bool), goes_on[:, 1:]], axis=1), axis=1)
        return tracks, on[:, None] & still & (step < left)
