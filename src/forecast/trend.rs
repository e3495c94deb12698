//! The trend: an ordinary least-squares line through (day, daily peak) points.
//!
//! Chosen for being explainable in one sentence ("the straight line closest to the
//! daily peaks, in squared error") and checkable by hand; a week of hourly history is
//! too short for seasonal models, and a growing pool grows roughly linearly over the
//! weeks a forecast looks ahead. A single point gives a flat line through it.

/// `value(x) = intercept + slope · x`, with `x` in days.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    pub intercept: f64,
    /// Change per day.
    pub slope: f64,
}

impl Line {
    /// The least-squares line through `points` (x, y); `None` without points. Points
    /// all at one x give a flat line through their mean.
    pub fn fit(points: &[(f64, f64)]) -> Option<Line> {
        if points.is_empty() {
            return None;
        }
        let n = points.len() as f64;
        let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        // Centred sums: exact for the small integers of a known-answer test, and no
        // cancellation when x is large (days since the epoch).
        let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        Some(Line {
            intercept: mean_y - slope * mean_x,
            slope,
        })
    }

    pub fn at(&self, x: f64) -> f64 {
        self.intercept + self.slope * x
    }

    /// The first x ≥ `from` where the line is above `level`: `from` if it already is,
    /// `None` if it never gets there (flat or falling below it).
    pub fn crosses_above(&self, level: f64, from: f64) -> Option<f64> {
        if self.at(from) > level {
            return Some(from);
        }
        if self.slope <= 0.0 {
            return None;
        }
        Some(((level - self.intercept) / self.slope).max(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on a known line give that line back; noise around it averages out.
    #[test]
    fn fits_a_known_line() {
        let exact: Vec<(f64, f64)> = (0..7)
            .map(|d| (d as f64, 100.0 + 10.0 * d as f64))
            .collect();
        let line = Line::fit(&exact).unwrap();
        assert!((line.slope - 10.0).abs() < 1e-9 && (line.intercept - 100.0).abs() < 1e-9);
        let noisy: Vec<(f64, f64)> = (0..8)
            .map(|d| {
                (
                    d as f64,
                    50.0 + 2.0 * d as f64 + if d % 2 == 0 { 1.0 } else { -1.0 },
                )
            })
            .collect();
        let line = Line::fit(&noisy).unwrap();
        assert!((line.slope - 2.0).abs() < 0.3, "{line:?}");
        assert_eq!(Line::fit(&[]), None);
        let flat = Line::fit(&[(3.0, 7.0)]).unwrap();
        assert_eq!((flat.slope, flat.at(100.0)), (0.0, 7.0));
    }

    /// A rising line crosses where it meets the level; a flat one below never does;
    /// one already above crosses "now".
    #[test]
    fn crossing_points() {
        let line = Line {
            intercept: 95.0,
            slope: 10.0,
        };
        assert_eq!(line.crosses_above(190.0, 7.0), Some(9.5));
        assert_eq!(line.crosses_above(150.0, 7.0), Some(7.0));
        let flat = Line {
            intercept: 100.0,
            slope: 0.0,
        };
        assert_eq!(flat.crosses_above(190.0, 7.0), None);
        let falling = Line {
            intercept: 100.0,
            slope: -1.0,
        };
        assert_eq!(falling.crosses_above(190.0, 7.0), None);
    }
}
