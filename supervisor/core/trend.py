"""A robust growth rate over a whole worker life, at O(1) per observation: Theil-Sen over thinned points.

The policy's own trend (``policy.SlidingTheilSen``) keeps every step of a short window and updates its sorted
slopes on every step: right for a decision that must follow the latest steps. Diagnosis wants the opposite
trade: the whole life, and nearly no cost per message. ``ThinnedTrend`` keeps at most ``2 * keep`` points,
one every ``stride`` (of steps, or seconds); when full, every other point goes and the stride doubles. A point
costs a comparison most of the time and an append otherwise; the fit (all pairwise slopes of at most 64
points, sorted) is computed only when asked, and kept until a point arrives.
"""

from __future__ import annotations

import dataclasses
import math

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclasses.dataclass(frozen=True)
class Fit:
    """A Theil-Sen slope (units of y per unit of x) with Sen's 95% confidence interval, over ``points``."""

    slope: float
    low: float
    high: float
    points: int

    def as_dict(self) -> dict[str, float | int]:
        return {"slope": round(self.slope, 3), "low": round(self.low, 3), "high": round(self.high, 3),
                "points": self.points}


def theil_sen_fit(points: list[tuple[float, int]]) -> Fit | None:
    """Median pairwise slope and Sen's (1968) distribution-free 95% interval; None under 4 points.

    The interval is the pair of order statistics of the sorted slopes at (N -/+ C)/2, with N the number of
    slopes and C = z * sqrt(n(n-1)(2n+5)/18), the standard deviation of Kendall's S without ties."""
    n = len(points)
    slopes = sorted((b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(points) for b in points[i + 1:]
                    if b[0] != a[0])
    count = len(slopes)
    if n < 4 or not count:
        return None
    middle = count // 2
    slope = slopes[middle] if count % 2 else (slopes[middle - 1] + slopes[middle]) / 2
    spread = Z95 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    low = slopes[max(0, math.floor((count - spread) / 2))]
    high = slopes[min(count - 1, math.ceil((count + spread) / 2))]
    return Fit(slope, min(low, slope), max(high, slope), n)


class ThinnedTrend:
    """Points (x, y) of a whole life, thinned so at most ``2 * keep`` stay; ``fit`` on demand."""

    def __init__(self, stride: float = 1.0, keep: int = 32) -> None:
        self.stride = stride
        self.keep = keep
        self.points: list[tuple[float, int]] = []
        self.next = -math.inf  # the least x kept next
        self._fit: Fit | None = None
        self._fresh = True  # _fit is current

    def add(self, x: float, y: int) -> bool:
        """Observe y at x (x never decreasing); True when the point was kept."""
        if x < self.next:
            return False
        points = self.points
        points.append((x, y))
        self.next = x + self.stride
        self._fresh = False
        if len(points) >= 2 * self.keep:
            del points[::2]  # the newest point stays
            self.stride *= 2
        return True

    @property
    def last(self) -> tuple[float, int] | None:
        return self.points[-1] if self.points else None

    def fit(self) -> Fit | None:
        if not self._fresh:
            self._fit, self._fresh = theil_sen_fit(self.points), True
        return self._fit
