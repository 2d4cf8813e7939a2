"""The dependency-free plots of probes/plots.py: points land where their values say."""
import pytest

from probe_select.probes.plots import COLORS, MARGIN, line_plot


def test_line_plot_places_every_point_at_its_x_value():
    width, height = 640, 220
    image = line_plot([{"probe": [0.0, 1.0, 0.5]}], ["spearman"], width=width, panel_height=height,
                      x_values=[[0.1, 0.2, 0.6]])
    left, top, right, bottom = MARGIN[0], MARGIN[1], width - MARGIN[2], height - MARGIN[3]
    lo, hi = -0.05, 1.05                       # the y range: the data's, padded by 5%

    def pixel(x, y):
        return (round(left + (x - 0.1) / 0.5 * (right - left)), round(bottom - (y - lo) / (hi - lo) * (bottom - top)))

    for x, y in [(0.1, 0.0), (0.2, 1.0), (0.6, 0.5)]:
        assert image.getpixel(pixel(x, y)) == COLORS[0], (x, y)
    # nothing drawn where there is no point (x = 0.4 would be the index-spaced middle point)
    assert image.getpixel(pixel(0.4, 1.0)) == (255, 255, 255)


def test_line_plot_refuses_x_values_that_do_not_match_the_series():
    with pytest.raises(ValueError, match="3 x values"):
        line_plot([{"probe": [0.1, 0.2]}], ["t"], x_values=[[0.1, 0.2, 0.3]])


def test_tick_labels_use_the_fewest_digits_that_tell_the_ticks_apart():
    from probe_select.probes.plots import tick_labels

    assert tick_labels([0.0, 0.5, 1.0]) == ["0", "0.5", "1"]
    assert tick_labels([0.12345, 0.5, 0.98765]) == ["0.123", "0.5", "0.988"]
    # A curve that moves within 0.9986-1.0 (spatial entropy): 3 digits would print 0.999 twice.
    assert tick_labels([0.99855, 0.99925, 0.99995]) == ["0.9986", "0.9992", "1"]
    assert tick_labels([1.0, 1.0]) == ["1", "1"]
