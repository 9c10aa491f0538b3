//! How a connection chooses its destination: the weighted pick over a route's cumulative weights
//! and the client-address hash of `consistentHash.useSourceIp`. Defined once, here, and used by
//! the kernel programs (which run exactly this code), the operator's compiler and the snapshot
//! builder (which build routes with [`RouteValue::from_weights`]) and by host tests.
//!
//! Everything is `#[inline(always)]` with loops bounded by [`MAX_ROUTE_DESTINATIONS`] or the
//! address length, so the eBPF verifier accepts it inside a program.
use crate::{Ip16, MAX_ROUTE_DESTINATIONS, RouteValue};

/// Why a list of weighted destinations has no [`RouteValue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteWeightError {
    /// More than [`MAX_ROUTE_DESTINATIONS`] destinations have a positive weight.
    TooManyDestinations { positive: usize },
    /// The weights add up beyond `u32::MAX`.
    WeightOverflow,
    /// No destination has a positive weight.
    NoPositiveWeight,
}

impl core::fmt::Display for RouteWeightError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RouteWeightError::TooManyDestinations { positive } => write!(
                f,
                "{positive} destinations have a positive weight; at most {MAX_ROUTE_DESTINATIONS} fit in a route"
            ),
            RouteWeightError::WeightOverflow => write!(f, "the weights add up beyond {}", u32::MAX),
            RouteWeightError::NoPositiveWeight => write!(f, "no destination has a positive weight"),
        }
    }
}

impl RouteValue {
    /// The route over `(weight, backend set id)` destinations, in order. Destinations of weight 0
    /// are left out (they get no connection), so every stored weight is positive and the
    /// cumulative weights strictly increase, as the snapshot decoder requires.
    pub fn from_weights(
        destinations: impl IntoIterator<Item = (u32, u32)>,
    ) -> Result<RouteValue, RouteWeightError> {
        let mut value = RouteValue {
            destination_count: 0,
            total_weight: 0,
            cumulative_weight: [0; MAX_ROUTE_DESTINATIONS],
            backend_set: [0; MAX_ROUTE_DESTINATIONS],
        };
        let mut positive = 0usize;
        for (weight, set_id) in destinations {
            if weight == 0 {
                continue;
            }
            positive += 1;
            if positive > MAX_ROUTE_DESTINATIONS {
                continue;
            }
            let slot = positive - 1;
            value.total_weight = value
                .total_weight
                .checked_add(weight)
                .ok_or(RouteWeightError::WeightOverflow)?;
            value.cumulative_weight[slot] = value.total_weight;
            value.backend_set[slot] = set_id;
            value.destination_count += 1;
        }
        if positive > MAX_ROUTE_DESTINATIONS {
            return Err(RouteWeightError::TooManyDestinations { positive });
        }
        if positive == 0 {
            return Err(RouteWeightError::NoPositiveWeight);
        }
        Ok(value)
    }

    /// The backend set a connection takes for a uniform random `random`: a draw in
    /// `0..total_weight`, then the first destination whose cumulative weight exceeds it. `None`
    /// when the route is empty or malformed (a total weight of 0, a draw past the last weight).
    #[inline(always)]
    pub fn pick(&self, random: u32) -> Option<u32> {
        let draw = random.checked_rem(self.total_weight)?;
        let mut i = 0;
        while i < MAX_ROUTE_DESTINATIONS {
            if i as u32 >= self.destination_count {
                return None;
            }
            if draw < self.cumulative_weight[i] {
                return Some(self.backend_set[i]);
            }
            i += 1;
        }
        None
    }

    /// The weight of each used destination, with its backend set id, in order.
    pub fn weights(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let used = (self.destination_count as usize).min(MAX_ROUTE_DESTINATIONS);
        let mut previous = 0u32;
        (0..used).map(move |i| {
            let weight = self.cumulative_weight[i].wrapping_sub(previous);
            previous = self.cumulative_weight[i];
            (weight, self.backend_set[i])
        })
    }
}

/// A stable hash of a client's workload address (FNV-1a, then a murmur3 finalizer for spread):
/// with `consistentHash.useSourceIp` the endpoint index is `source_hash(ip) % endpoint_count`.
#[inline(always)]
pub fn source_hash(ip: &Ip16) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        h ^= u32::from(ip[i]);
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_mapped;

    #[test]
    fn weights_become_cumulative_and_zero_is_left_out() {
        let r = RouteValue::from_weights([(90, 7), (0, 8), (10, 9)]).unwrap();
        assert_eq!(r.destination_count, 2);
        assert_eq!(r.total_weight, 100);
        assert_eq!(&r.cumulative_weight[..3], &[90, 100, 0]);
        assert_eq!(&r.backend_set[..3], &[7, 9, 0]);
        let mut weights = [(0, 0); 2];
        for (slot, w) in weights.iter_mut().zip(r.weights()) {
            *slot = w;
        }
        assert_eq!(weights, [(90, 7), (10, 9)]);
    }

    #[test]
    fn bad_weight_lists_are_refused() {
        assert_eq!(
            RouteValue::from_weights([(0, 1), (0, 2)]),
            Err(RouteWeightError::NoPositiveWeight)
        );
        assert_eq!(
            RouteValue::from_weights([(u32::MAX, 1), (1, 2)]),
            Err(RouteWeightError::WeightOverflow)
        );
        let many = (0..17).map(|i| (1, i));
        assert_eq!(
            RouteValue::from_weights(many),
            Err(RouteWeightError::TooManyDestinations { positive: 17 })
        );
    }

    #[test]
    fn pick_follows_the_weights_exactly() {
        let r = RouteValue::from_weights([(50, 1), (30, 2), (20, 3)]).unwrap();
        let mut counts = [0u32; 4];
        // Every draw in 0..total_weight once: the counts are the weights.
        for draw in 0..r.total_weight {
            counts[r.pick(draw).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [0, 50, 30, 20]);
        // A random value wraps onto the draw range.
        assert_eq!(r.pick(100 + 79), Some(2));
        assert_eq!(r.pick(100 + 80), Some(3));
    }

    #[test]
    fn pick_refuses_malformed_routes() {
        let mut r = RouteValue::from_weights([(5, 1)]).unwrap();
        r.total_weight = 0;
        assert_eq!(r.pick(3), None);
        let mut r = RouteValue::from_weights([(5, 1)]).unwrap();
        r.total_weight = 10; // past the last cumulative weight
        assert_eq!(r.pick(7), None);
    }

    #[test]
    fn source_hash_is_stable_and_spreads() {
        let a = ipv4_mapped([10, 0, 0, 1]);
        assert_eq!(source_hash(&a), source_hash(&a));
        // 256 consecutive client addresses over 4 endpoints: every endpoint gets a fair share.
        let mut counts = [0u32; 4];
        for last in 0..=255u8 {
            counts[(source_hash(&ipv4_mapped([10, 0, 0, last])) % 4) as usize] += 1;
        }
        for c in counts {
            assert!((40..=88).contains(&c), "uneven spread {counts:?}");
        }
    }
}
