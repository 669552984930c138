"""What the caller heard when they interrupt: broadcast bookkeeping from FreeSWITCH's PLAYBACK events."""

from __future__ import annotations

from bridge.playback import BroadcastPlayer


class Control:
    def __init__(self) -> None:
        self.played: list[str] = []
        self.breaks = 0

    def play(self, path: str) -> None:
        self.played.append(path)

    def break_all(self) -> None:
        self.breaks += 1

    def break_current(self) -> None:
        self.breaks += 1


def ms(n: int, rate: int = 8000) -> bytes:
    return b"\0\1" * (rate * n // 1000)


def test_interrupted_between_two_chunks_credits_what_was_heard(tmp_path):
    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000)
    player.feed(ms(160), "A")  # the short first chunk goes at once
    player.feed(ms(400), "A")
    first, second = control.played
    player.playback_started(first)
    player.playback_stopped(first, "done")  # the caller heard 160 ms; the next chunk has not started yet
    heard = player.stop()
    assert heard.response_id == "A" and heard.played_ms == 160 and heard.received_ms == 560
    assert control.breaks == 1 and heard.dropped == ("A",)
    assert not (tmp_path / second.rsplit("/", 1)[-1]).exists()  # never started: its file is gone already


def test_a_reply_queued_behind_the_one_playing_is_dropped_and_never_credited(tmp_path):
    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000)
    player.feed(ms(160), "A")
    player.response_done("A")
    player.feed(ms(160), "B")
    player.response_done("B")
    a_chunk, b_chunk = control.played
    player.playback_started(a_chunk)
    heard = player.stop()
    assert heard.response_id == "A" and heard.played_ms <= 160
    assert set(heard.dropped) == {"A", "B"}
    player.playback_started(b_chunk)  # it had left FreeSWITCH's queue before the break: stopped as well
    assert control.breaks == 2


def test_nothing_heard_means_nothing_to_truncate(tmp_path):
    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000)
    player.feed(ms(160), "A")
    heard = player.stop()
    assert heard.response_id == "A" and heard.played_ms == 0
