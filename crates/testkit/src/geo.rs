//! Small MaxMind databases for tests, written by PyPI's `mmdb-writer` (which `./stand test`
//! installs): addresses mapped to countries, cities, ASNs and networks.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// One address and what the databases say of it.
pub struct Place {
    pub ip: Ipv4Addr,
    pub country: &'static str,
    pub city: &'static str,
    pub asn: u32,
    pub network: &'static str,
}

const SCRIPT: &str = r#"
import json, sys
from mmdb_writer import MMDBWriter, MmdbU32
from netaddr import IPSet
places, city_path, asn_path = json.loads(sys.stdin.read()), sys.argv[1], sys.argv[2]
city = MMDBWriter(ip_version=4, database_type="GeoIP2-City")
asn = MMDBWriter(ip_version=4, database_type="GeoLite2-ASN")
for p in places:
    net = IPSet([p["ip"] + "/32"])
    city.insert_network(net, {"country": {"iso_code": p["country"]}, "city": {"names": {"en": p["city"]}}})
    asn.insert_network(net, {"autonomous_system_number": MmdbU32(p["asn"]), "autonomous_system_organization": p["network"]})
city.to_db_file(city_path)
asn.to_db_file(asn_path)
"#;

/// Write a City and an ASN database knowing `places`.
pub fn write_databases(places: &[Place], city: &Path, asn: &Path) {
    let json = serde_json::Value::Array(
        places
            .iter()
            .map(|p| {
                serde_json::json!({"ip": p.ip.to_string(), "country": p.country, "city": p.city, "asn": p.asn, "network": p.network})
            })
            .collect(),
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(city)
        .arg(asn)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (./stand test installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(json.to_string().as_bytes())
            .expect("writing places");
    }
    let out = child.wait_with_output().expect("mmdb-writer");
    assert!(
        out.status.success(),
        "mmdb-writer failed (pip install mmdb-writer): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
