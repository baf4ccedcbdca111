"""The moving-digits source (determinism, the motion rule) and the video metrics."""

import pickle

import numpy as np
import pytest
from PIL import Image

from apt_jax.data.digits import load_digits_arrays
from apt_jax.data.moving_digits import MovingDigitsSource, bounce
from apt_jax.data.pipeline import make_train_iterator
from apt_jax.eval import video_metrics as vm
from apt_jax.eval.grid import save_video_gif, save_video_strips


def simulate_corner(start: int, velocity: int, travel: int, frames: int) -> list[int]:
    """A ball between walls at 0 and `travel`, stepped frame by frame (an independent
    statement of the motion rule)."""
    pos, vel, out = start, velocity, []
    for _ in range(frames):
        out.append(pos)
        for _ in range(abs(vel)):  # one pixel at a time, turning at a wall
            if not 0 <= pos + np.sign(vel) <= travel:
                vel = -vel
            pos += np.sign(vel)
    return out


def test_bounce_hand_values():
    u = np.array([0, 3, 8, 9, 15, 16, 17, -1, -8, -9])
    np.testing.assert_array_equal(bounce(u, 8), [0, 3, 8, 7, 1, 0, 1, 1, 8, 7])


def test_clips_are_deterministic_per_seed():
    a, b = MovingDigitsSource(seed=3), MovingDigitsSource(seed=3)
    for i in (0, 1, 777):
        np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
        assert a[i]["label"] == b[i]["label"]
    other = MovingDigitsSource(seed=4)
    assert any(not np.array_equal(a[i]["video"], other[i]["video"]) for i in range(4))
    # Pickles (grain workers) into an equal source.
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c[5]["video"], a[5]["video"])


def test_clips_obey_the_motion_rule():
    source = MovingDigitsSource(num_frames=12, canvas=16, max_speed=2, num_clips=64)
    digits, labels = load_digits_arrays()
    for i in range(len(source)):
        p = source.clip_parameters(i)
        item = source[i]
        assert item["video"].shape == (12, 16, 16, 1) and item["video"].dtype == np.float32
        assert item["label"] == labels[p["digit"]]
        assert np.all(p["velocity"] != 0) and np.all(np.abs(p["velocity"]) <= 2)
        corners = source.corners(i)
        for axis in range(2):
            want = simulate_corner(int(p["start"][axis]), int(p["velocity"][axis]), 8, 12)
            np.testing.assert_array_equal(corners[:, axis], want)
        for f, (r, c) in enumerate(corners):
            frame = item["video"][f]
            # The digit, exactly, at its corner; black everywhere else.
            np.testing.assert_array_equal(frame[r : r + 8, c : c + 8], digits[p["digit"]])
            outside = np.ones((16, 16), bool)
            outside[r : r + 8, c : c + 8] = False
            assert np.all(frame[..., 0][outside] == -1.0)


def test_one_frame_clips_are_images_and_every_position_occurs():
    source = MovingDigitsSource(num_frames=1, num_clips=500)
    assert source[0]["video"].shape == (1, 12, 12, 1)
    corners = np.concatenate([source.corners(i) for i in range(len(source))])
    assert set(map(tuple, corners)) == {(r, c) for r in range(5) for c in range(5)}


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="canvas=6 is smaller"):
        MovingDigitsSource(canvas=6)
    with pytest.raises(ValueError, match="num_frames=0 must be >= 1"):
        MovingDigitsSource(num_frames=0)
    with pytest.raises(IndexError, match=r"clip 4 outside \[0, 4\)"):
        MovingDigitsSource(num_clips=4)[4]


def test_source_feeds_the_grain_pipeline():
    it = make_train_iterator(
        MovingDigitsSource(num_clips=64),
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["video"].shape == (8, 4, 12, 12, 1) and batch["label"].shape == (8,)


# ------------------------------------------------------------------- metrics
@pytest.fixture(scope="module")
def real_clips():
    """8 frames of 16x16: long enough paths that a wrong one cannot fit by chance."""
    return MovingDigitsSource(num_frames=8, canvas=16, num_clips=600, seed=7).clips(range(600))


@pytest.mark.parametrize("geometry", ["8x16x16", "recipe 4x12x12"])
def test_real_clips_score_as_real(real_clips, geometry):
    if geometry == "8x16x16":
        videos, labels = real_clips
    else:  # the recipes' clips (the source's defaults)
        videos, labels = MovingDigitsSource(seed=7, num_clips=1000).clips(range(1000))
    m = vm.evaluate_moving_digits(videos, labels)
    assert m["motion_error"] < 1e-9  # the fit grid holds every real path exactly
    assert m["frame_accuracy"] >= 0.98
    assert m["frame_frechet_distance"] < 0.5
    assert 1.0 <= m["mean_speed"] <= 2.0  # |v| in {1, 2}, slowed only at bounces


def test_metrics_see_what_is_wrong(real_clips):
    videos, labels = real_clips
    real = vm.evaluate_moving_digits(videos, labels)
    # A digit that sits still: moments and digits fine, motion wrong.
    still = vm.evaluate_moving_digits(np.repeat(videos[:, :1], 8, axis=1), labels)
    assert still["mean_speed"] == 0.0 and still["motion_error"] > 0.5
    # Frames out of order: each frame is real (same distance), the path is not.
    shuffled = videos[:, np.random.default_rng(0).permutation(8)]
    jumbled = vm.evaluate_moving_digits(shuffled, labels)
    assert jumbled["frame_frechet_distance"] == pytest.approx(real["frame_frechet_distance"])
    assert jumbled["motion_error"] > 0.5
    # Noise: worse distance and accuracy.
    noisy = np.clip(videos + np.random.default_rng(0).normal(0, 0.4, videos.shape), -1, 1)
    bad = vm.evaluate_moving_digits(noisy, labels)
    assert bad["frame_frechet_distance"] > 10 * real["frame_frechet_distance"]
    assert bad["frame_accuracy"] < real["frame_accuracy"]
    # Wrong labels: accuracy near 0.
    assert vm.frame_accuracy(videos, (labels + 1) % 10) < 0.05


def test_crop_and_centre_of_mass_by_hand():
    frame = np.full((1, 16, 16, 1), -1.0, np.float32)
    frame[0, 5, 9] = 1.0  # one full-ink pixel
    frame[0, 7, 9] = 0.0  # one half-ink pixel
    com = vm.centres_of_mass(frame[None])[0, 0]
    np.testing.assert_allclose(com, [(5 * 1 + 7 * 0.5) / 1.5, 9.0])
    crop = vm.crop_digits(frame)
    assert crop.shape == (1, 8, 8, 1) and (crop > -1).sum() == 2  # both pixels inside
    blank = np.full((1, 1, 16, 16, 1), -1.0)
    np.testing.assert_allclose(vm.centres_of_mass(blank)[0, 0], [7.5, 7.5])


def test_motion_error_of_a_known_wobble():
    """A real clip whose frames are shifted by +-1 column alternately: the column track
    departs from the clip's path by a square wave of amplitude 1."""
    source = MovingDigitsSource(num_frames=8, canvas=16, num_clips=1, seed=0)
    video = source[0]["video"].copy()
    for f in range(1, 8, 2):
        video[f] = np.roll(video[f], 1, axis=1) if source.corners(0)[f, 1] < 8 else video[f]
    error = vm.motion_errors(video[None])[0]
    assert 0.1 < error <= 1.0


def test_video_metrics_reject_images():
    with pytest.raises(ValueError, match=r"\(N, F, S, S, 1\)"):
        vm.evaluate_moving_digits(np.zeros((4, 16, 16, 1)), np.zeros(4))


def test_strips_and_gif(tmp_path):
    videos = MovingDigitsSource(num_frames=8, canvas=16, num_clips=3).clips(range(3))[0]
    grid = save_video_strips(videos, tmp_path / "s.png", upscale=2)
    # 3 rows of 8 frames, each 16 * 2 pixels with 1-pixel padding.
    assert grid.shape == (3 * 33 + 1, 8 * 33 + 1, 1)
    grids = save_video_gif(videos, tmp_path / "s.gif", nrow=3, upscale=1)
    with Image.open(tmp_path / "s.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (3 * 17 + 1, 17 + 1)
        gif.seek(5)
        np.testing.assert_array_equal(np.asarray(gif.convert("L")), grids[5][..., 0])
