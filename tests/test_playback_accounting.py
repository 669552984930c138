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


def test_a_real_time_reply_starts_after_a_short_lead_which_grows_when_freeswitch_catches_up(tmp_path):
    """A growing native file: an engine at exactly real time (100 ms pieces, 100 ms apart) starts playing
    NATIVE_START_AFTER_S after its first audio, not a whole piece later; each time FreeSWITCH reached the end of
    what was written (PLAYBACK_STOP done with fewer bytes read), the rest goes on at once and that call's next
    replies wait a step longer."""
    import time

    import gevent

    from bridge.audio import PCMU, AudioFormat
    from bridge.playback import NATIVE_LEAD_STEP_S, NATIVE_START_AFTER_S

    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000, native=AudioFormat(PCMU, 8000))
    fed = time.monotonic()
    player.feed(b"\xff" * 800, "A")  # 100 ms of PCMU
    assert not control.played
    for _ in range(100):
        if control.played:
            break
        gevent.sleep(0.005)
    waited = time.monotonic() - fed
    assert control.played and NATIVE_START_AFTER_S - 0.005 <= waited < NATIVE_START_AFTER_S + 0.05
    first = control.played[0]
    player.playback_started(first)
    player.feed(b"\xff" * 800, "A")  # the next piece, after FreeSWITCH read only the first 100 ms
    player.playback_stopped(first, "done", read_bytes=800)
    assert player._start_after == NATIVE_START_AFTER_S + NATIVE_LEAD_STEP_S
    # the unread 100 ms go on at once in a new file (waiting would only lengthen the hole)
    assert len(control.played) == 2 and (tmp_path / control.played[1].rsplit("/", 1)[-1]).stat().st_size == 800
    player.response_done("A")
    fed = time.monotonic()
    player.feed(b"\xff" * 800, "B")  # the next reply starts after the longer lead
    for _ in range(100):
        if len(control.played) == 3:
            break
        gevent.sleep(0.005)
    assert len(control.played) == 3 and time.monotonic() - fed >= NATIVE_START_AFTER_S + NATIVE_LEAD_STEP_S - 0.005
    player.close()


def test_after_an_esl_outage_files_that_must_have_ended_stop_counting_as_playing(tmp_path):
    """Their PLAYBACK_STOP was lost with the connection: a complete file whose time has passed is over, and the
    next one queued behind it too (FreeSWITCH plays them back to back); the heard time is credited in full."""
    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000)
    player.feed(ms(160), "A")
    player.feed(ms(320), "A")
    player.response_done("A")
    first, second = control.played
    player.playback_started(first)
    player._chunks[first].started_at -= 5.0  # as if the outage lasted 5 s
    assert player.playing
    player.reconcile()
    assert not player.playing and player.stop() is None
    assert player._heard_ms["A"] == 480
    assert not (tmp_path / second.rsplit("/", 1)[-1]).exists()


def test_after_an_esl_outage_a_file_still_playing_is_left_alone(tmp_path):
    control = Control()
    player = BroadcastPlayer(control, str(tmp_path), "uuid-1", 8000)
    player.feed(ms(400), "A")
    player.response_done("A")
    (only,) = control.played
    player.playback_started(only)
    player.reconcile()
    assert player.playing
    heard = player.stop()
    assert heard is not None and heard.response_id == "A" and heard.played_ms < 400
