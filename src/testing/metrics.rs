//! Reading the bridge's Prometheus exposition in tests: one scrape, one sample.

/// `GET /metrics` on 127.0.0.1:`port`; empty when the server does not answer (yet).
pub fn scrape(port: u16) -> String {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    super::http::get(addr, "/metrics")
        .map(|response| response.body)
        .unwrap_or_default()
}

/// The value of one sample line: `series` is the name with its labels exactly as exposed
/// (`name{a="b"}`), followed by a space and the value.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_series_is_matched_whole_not_by_prefix() {
        let text = "a_total{x=\"1\"} 3\na_total_more 9\na_total 4 1700000000\n";
        assert_eq!(sample(text, "a_total{x=\"1\"}"), Some(3.0));
        assert_eq!(sample(text, "a_total"), Some(4.0));
        assert_eq!(sample(text, "b_total"), None);
    }
}
