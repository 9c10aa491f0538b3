//! The network-namespace side of the bookinfo fixture (`tests/fixtures/bookinfo/cluster.yaml`): a
//! productpage client pod and the three reviews pods at the fixture's addresses, each reviews pod
//! answering on 9080 with its name.
use std::{io, net::Ipv4Addr};

use crate::{Pod, ProbeReport, TcpServer, TestCgroup, TestNetwork};

/// The reviews Service's VIP:port in the fixture.
pub const REVIEWS_VIP: &str = "10.96.77.13:9080";

pub struct BookinfoPods {
    pub productpage: Pod,
    /// The reviews servers (reviewsv1, reviewsv2, reviewsv3); they stop when dropped.
    pub reviews: Vec<TcpServer>,
}

impl BookinfoPods {
    pub fn new(net: &TestNetwork) -> io::Result<BookinfoPods> {
        let productpage = net.add_pod("productpage", Ipv4Addr::new(10, 244, 77, 10), None)?;
        let mut reviews = Vec::new();
        for (name, host) in [("reviewsv1", 21), ("reviewsv2", 22), ("reviewsv3", 23)] {
            let pod = net.add_pod(name, Ipv4Addr::new(10, 244, 77, host), None)?;
            reviews.push(pod.serve_tcp(9080)?);
        }
        Ok(BookinfoPods {
            productpage,
            reviews,
        })
    }

    /// `count` connections from productpage to the reviews VIP.
    pub fn probe_reviews(&self, cgroup: &TestCgroup, count: u32) -> io::Result<ProbeReport> {
        self.productpage.run_probe(
            cgroup,
            &[
                "--target",
                REVIEWS_VIP,
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "2000",
            ],
        )
    }
}
