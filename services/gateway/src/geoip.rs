//! Locating agents by their address with MaxMind databases (`GEOIP_CITY_DB`, `GEOIP_ASN_DB`),
//! for agents that do not declare a location.

use std::net::IpAddr;
use std::path::Path;

use checkplane_runtime::ConfigError;
use checkplane_wire::events::Location;
use maxminddb::{geoip2, Reader};

/// Open databases.
pub struct GeoIp {
    city: Option<Reader<Vec<u8>>>,
    asn: Option<Reader<Vec<u8>>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("city", &self.city.is_some())
            .field("asn", &self.asn.is_some())
            .finish()
    }
}

fn open(var: &str, path: &Path) -> Result<Reader<Vec<u8>>, ConfigError> {
    Reader::open_readfile(path).map_err(|e| {
        ConfigError::new(
            var,
            format!("cannot open MaxMind database {}: {e}", path.display()),
        )
    })
}

impl GeoIp {
    /// Open whichever databases are configured; `None` when neither is.
    pub fn open(city: Option<&Path>, asn: Option<&Path>) -> Result<Option<Self>, ConfigError> {
        if city.is_none() && asn.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            city: city.map(|p| open("GEOIP_CITY_DB", p)).transpose()?,
            asn: asn.map(|p| open("GEOIP_ASN_DB", p)).transpose()?,
        }))
    }

    /// What the databases know of `ip`; `None` when they know nothing.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        let mut location = Location::default();
        if let Some(reader) = &self.city {
            if let Ok(Some(city)) = reader
                .lookup(ip)
                .and_then(|r| r.decode::<geoip2::City<'_>>())
            {
                location.country = city.country.iso_code.map(str::to_ascii_uppercase);
                location.city = city.city.names.english.map(str::to_owned);
            }
        }
        if let Some(reader) = &self.asn {
            if let Ok(Some(asn)) = reader
                .lookup(ip)
                .and_then(|r| r.decode::<geoip2::Asn<'_>>())
            {
                location.asn = asn.autonomous_system_number;
                location.network = asn.autonomous_system_organization.map(str::to_owned);
            }
        }
        (location != Location::default()).then_some(location)
    }
}
