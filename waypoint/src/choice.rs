//! Where a request goes: a destination among a route's weighted clusters, then an endpoint of the
//! cluster by its load balancer. It owns the balancers' state (a round-robin counter, a hash ring,
//! the in-flight count of every endpoint) and promises choices that never panic and never pick an
//! endpoint or destination that does not exist: `None` means there is none to pick (no endpoint:
//! Envoy's `UH`, a 503).
//!
//! Randomness is a `draw: &mut impl FnMut() -> u32` (a uniform `u32`), so that tests are
//! deterministic and the proxy brings its own generator. A draw becomes a number below `n` by
//! `draw * n >> 32` (no modulo, and its bias is below 2^-32 per value for the sizes here).
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use kmesh_snapshot::waypoint::{Cluster, HashCookie, HashKey, LoadBalancer, WeightedCluster};

use crate::{identity::Client, matching::RequestHead, matching::query_param};

/// Virtual nodes per endpoint on a consistent-hash ring: enough for an even spread (about ±10%
/// per endpoint), few enough to build a ring of thousands of endpoints in a millisecond.
pub const RING_POINTS_PER_ENDPOINT: usize = 100;

/// A number in `0..n` from a uniform draw (`n` at most 2^32).
fn below(draw: u32, n: u64) -> u64 {
    (u64::from(draw) * n) >> 32
}

/// The index of the destination a request goes to, by weight (weight 0: never). `None`: no
/// destination, or every weight 0 (validation refuses both for HTTP routes).
pub fn choose_destination(
    destinations: &[WeightedCluster],
    draw: &mut impl FnMut() -> u32,
) -> Option<usize> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 || total > 1 << 32 {
        return None;
    }
    let mut pick = below(draw(), total);
    for (index, destination) in destinations.iter().enumerate() {
        let weight = u64::from(destination.weight);
        if pick < weight {
            return Some(index);
        }
        pick -= weight;
    }
    None
}

/// Requests in flight to one endpoint, for least request. The proxy holds an [`InFlight`] while
/// a request is with the endpoint.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    in_flight: AtomicU64,
}

impl EndpointLoad {
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// One request in flight to an endpoint; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cluster of the table with its balancer's state.
#[derive(Debug)]
pub struct ClusterTable {
    pub spec: Cluster,
    /// One per endpoint of `spec`, in its order.
    pub loads: Vec<Arc<EndpointLoad>>,
    round_robin: AtomicUsize,
    /// Built for a consistent-hash cluster only.
    ring: Option<Ring>,
}

/// The endpoint chosen for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointChoice {
    /// An index into the cluster's endpoints (and loads).
    pub index: usize,
    /// A cookie the response must set (a cookie hash whose cookie the request lacked).
    pub set_cookie: Option<SetCookie>,
}

/// A `Set-Cookie` the proxy adds to the response, as Envoy does for a hash cookie with a ttl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    pub path: Option<String>,
    /// `None`: a session cookie (a ttl under a second, as Envoy rounds it down to 0).
    pub max_age_seconds: Option<u64>,
}

impl SetCookie {
    /// The `Set-Cookie` header's value: `name=value; Max-Age=N; Path=/p; HttpOnly`.
    pub fn header_value(&self) -> String {
        let mut value = format!("{}={}", self.name, self.value);
        if let Some(age) = self.max_age_seconds {
            value.push_str(&format!("; Max-Age={age}"));
        }
        if let Some(path) = &self.path {
            value.push_str(&format!("; Path={path}"));
        }
        value.push_str("; HttpOnly");
        value
    }
}

impl ClusterTable {
    pub fn new(spec: Cluster) -> ClusterTable {
        let ring = match spec.load_balancer {
            LoadBalancer::ConsistentHash(_) => Some(Ring::new(&spec)),
            _ => None,
        };
        ClusterTable {
            loads: spec.endpoints.iter().map(|_| Arc::default()).collect(),
            spec,
            round_robin: AtomicUsize::new(0),
            ring,
        }
    }

    /// The endpoint for `request` by the cluster's load balancer; `None`: no endpoint.
    pub fn choose_endpoint(
        &self,
        request: &RequestHead<'_>,
        client: &Client<'_>,
        draw: &mut impl FnMut() -> u32,
    ) -> Option<EndpointChoice> {
        let count = self.spec.endpoints.len();
        if count == 0 {
            return None;
        }
        let n = count as u64;
        let plain = |index| EndpointChoice {
            index,
            set_cookie: None,
        };
        let index = match &self.spec.load_balancer {
            LoadBalancer::Random => below(draw(), n) as usize,
            LoadBalancer::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed) % count,
            LoadBalancer::LeastRequest => self.least_request(draw),
            LoadBalancer::ConsistentHash(key) => {
                let (hash, set_cookie) = match hash_of_key(key, request, client) {
                    Some(found) => found,
                    None => return Some(plain(below(draw(), n) as usize)),
                };
                let index = self.ring.as_ref().and_then(|r| r.lookup(hash));
                return Some(EndpointChoice {
                    index: index.unwrap_or_else(|| below(draw(), n) as usize),
                    set_cookie,
                });
            }
        };
        Some(plain(index))
    }

    /// Power of two choices: two distinct random endpoints, the one with fewer requests in flight
    /// (the first on a tie).
    fn least_request(&self, draw: &mut impl FnMut() -> u32) -> usize {
        let n = self.spec.endpoints.len();
        if n < 2 {
            return 0;
        }
        let first = below(draw(), n as u64) as usize;
        let second = (first + 1 + below(draw(), n as u64 - 1) as usize) % n;
        let load = |i: usize| self.loads.get(i).map_or(0, |l| l.in_flight());
        if load(second) < load(first) {
            second
        } else {
            first
        }
    }
}

/// The hash of a request's key, and the cookie to set when the key is a cookie the request
/// lacks and the cookie has a ttl; `None`: the request has no key (it goes to a random endpoint).
fn hash_of_key(
    key: &HashKey,
    request: &RequestHead<'_>,
    client: &Client<'_>,
) -> Option<(u64, Option<SetCookie>)> {
    match key {
        HashKey::Header(name) => {
            // Several values: hashed sorted, so their order does not matter (as Envoy).
            let mut values: Vec<&[u8]> = request
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            if values.is_empty() {
                return None;
            }
            values.sort_unstable();
            Some((stable_hash(&values.join(&0u8)), None))
        }
        HashKey::Cookie(cookie) => match cookie_value(request, &cookie.name) {
            Some(value) => Some((stable_hash(value.as_bytes()), None)),
            None => new_cookie(cookie, client.address),
        },
        HashKey::SourceIp => Some((stable_hash(client.address.to_string().as_bytes()), None)),
        HashKey::QueryParameter(name) => {
            let value = query_param(request.query, name)?;
            Some((stable_hash(value.as_bytes()), None))
        }
    }
}

/// A cookie for a client that has none (only with a ttl): its value is derived from the client's
/// address, so the client's requests go to one endpoint before and after it holds the cookie.
fn new_cookie(cookie: &HashCookie, client: IpAddr) -> Option<(u64, Option<SetCookie>)> {
    let ttl_ms = cookie.ttl_ms?;
    let value = format!("{:016x}", stable_hash(client.to_string().as_bytes()));
    let max_age = ttl_ms / 1000;
    let set_cookie = SetCookie {
        name: cookie.name.clone(),
        value: value.clone(),
        path: cookie.path.clone(),
        max_age_seconds: (max_age > 0).then_some(max_age),
    };
    Some((stable_hash(value.as_bytes()), Some(set_cookie)))
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one).
fn cookie_value<'r>(request: &RequestHead<'r>, name: &str) -> Option<&'r str> {
    request
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|header| header.to_str().ok())
        .flat_map(|header| header.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.trim_matches('"'))
        })
}

/// A hash ring: [`RING_POINTS_PER_ENDPOINT`] points per endpoint, each at the hash of the
/// endpoint's address and the point's number, so an endpoint's points do not depend on the other
/// endpoints and removing one moves only the keys that were on it.
#[derive(Debug)]
struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    fn new(cluster: &Cluster) -> Ring {
        let mut points = Vec::with_capacity(
            cluster
                .endpoints
                .len()
                .saturating_mul(RING_POINTS_PER_ENDPOINT),
        );
        for (index, endpoint) in cluster.endpoints.iter().enumerate() {
            for point in 0..RING_POINTS_PER_ENDPOINT {
                let name = format!("{}_{point}", endpoint.address);
                points.push((stable_hash(name.as_bytes()), index));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint of the first point at or after `hash`, around the ring.
    fn lookup(&self, hash: u64) -> Option<usize> {
        let at = self.points.partition_point(|(point, _)| *point < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|(_, index)| *index)
    }
}

/// A hash that is the same in every process and every release: FNV-1a (64 bits), then
/// MurmurHash3's 64-bit finaliser so that keys differing in a byte land far apart on the ring.
/// (std's `DefaultHasher` is randomly keyed per process: two waypoint replicas would disagree.)
pub fn stable_hash(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = bytes.iter().fold(FNV_OFFSET, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests;
