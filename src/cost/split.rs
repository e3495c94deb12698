//! Splitting a whole amount in proportion to weights, in whole units, exactly
//! (the largest remainder method, also called Hamilton's).

/// Splits `total` (≥ 0) into parts proportional to `weights` (each ≥ 0) that add up to
/// `total` exactly: each part is the floor of its exact share `total × w / Σw`, and the
/// units left over (fewer than the parts) go one each to the largest fractional
/// remainders; ties go to the earlier weight. All weights zero: every part is 0 unless
/// `total` is not, then the last takes it all.
///
/// Weights so large that `total × Σw` would overflow `i128` are scaled down first
/// (halved until it fits): the parts then follow the weights' leading bits, and still
/// add up to `total`.
pub fn largest_remainder(total: i64, weights: &[i128]) -> Vec<i64> {
    let total_wide = i128::from(total.max(0));
    let mut weights: Vec<i128> = weights.iter().map(|w| (*w).max(0)).collect();
    while weights
        .iter()
        .try_fold(0i128, |sum, w| sum.checked_add(*w))
        .and_then(|sum| sum.checked_mul(total_wide.max(1)))
        .is_none()
    {
        weights.iter_mut().for_each(|w| *w >>= 1);
    }
    let sum: i128 = weights.iter().sum();
    let mut parts = vec![0i64; weights.len()];
    if sum == 0 {
        if let Some(last) = parts.last_mut() {
            *last = total.max(0);
        }
        return parts;
    }
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given: i128 = 0;
    for (index, weight) in weights.iter().enumerate() {
        let exact = total_wide * weight;
        let floor = exact / sum;
        parts[index] = i64::try_from(floor).unwrap_or(i64::MAX);
        given += floor;
        remainders.push((exact % sum, index));
    }
    // Larger remainder first; equal remainders in input order.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = usize::try_from(total_wide - given).unwrap_or(0);
    for (_, index) in remainders.into_iter().take(left) {
        parts[index] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares of 1/3, 1/6 and 1/2 of 1000: floors 333 + 166 + 500 = 999; the unit left
    /// goes to the largest remainder (166.67), so 333 / 167 / 500.
    #[test]
    fn the_unit_left_goes_to_the_largest_remainder() {
        assert_eq!(largest_remainder(1000, &[2, 1, 3]), vec![333, 167, 500]);
    }

    /// Equal remainders: the earlier parties get the units left (10 in three equal parts
    /// gives 4, 3, 3).
    #[test]
    fn ties_go_to_the_earlier_party() {
        assert_eq!(largest_remainder(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(largest_remainder(2, &[5, 5, 5]), vec![1, 1, 0]);
    }

    /// Zero weights: the last part takes everything; nothing to split gives zeros.
    #[test]
    fn zero_weights_and_zero_totals() {
        assert_eq!(largest_remainder(7, &[0, 0]), vec![0, 7]);
        assert_eq!(largest_remainder(0, &[3, 1]), vec![0, 0]);
        assert_eq!(largest_remainder(5, &[]), Vec::<i64>::new());
    }

    /// Weights too large for `total × Σw` are scaled down and still add up exactly.
    #[test]
    fn huge_weights_still_add_up() {
        let parts = largest_remainder(i64::MAX, &[i128::MAX / 2, i128::MAX / 4, 1]);
        assert_eq!(
            parts.iter().map(|p| i128::from(*p)).sum::<i128>(),
            i64::MAX.into()
        );
        assert!(parts[0] > parts[1]);
    }
}
