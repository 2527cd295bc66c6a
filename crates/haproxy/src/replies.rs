//! Reading HAProxy's Runtime API replies (see `HAPROXY-NOTES.md`): `show info` as
//! `Key: value` lines, `show servers state` (format 1) and `show stat` (CSV) by their header
//! names, and the admin-state bit mask, which HAProxy prints in decimal.
//!
//! Replies come from a process over a socket: anything may be cut short or odd. Every parser
//! returns what it could read or an error, never panics (a property test feeds them random and
//! truncated replies).

use std::collections::BTreeMap;

use checkplane_wire::events::ObservedServer;

/// A reply that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply to {command}: {why}")]
pub struct Malformed {
    pub command: &'static str,
    pub why: String,
}

fn malformed(command: &'static str, why: impl Into<String>) -> Malformed {
    Malformed {
        command,
        why: why.into(),
    }
}

/// HAProxy's own refusal of a command (`No such server.`, `Permission denied`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A raw reply as HAProxy meant it: its text (ending in one newline), or its error
/// (`[3]: No such server.`) as the message. Every command is sent after the severity prefix
/// ([`crate::relay::SEVERITY_PREFIX`]), whose own (empty) reply comes first; a blank line
/// ends the reply.
pub fn reply_body(raw: &str) -> Result<String, Refused> {
    let body = raw.strip_prefix('\n').unwrap_or(raw);
    let body = body.trim_end_matches('\n');
    if let Some(rest) = body.strip_prefix('[') {
        if let Some((level, message)) = rest.split_once("]: ") {
            if level.parse::<u8>().is_ok_and(|l| l <= 3) {
                return Err(Refused(message.trim().to_owned()));
            }
        }
    }
    Ok(format!("{body}\n"))
}

/// `show info`: every `Key: value` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Info(pub BTreeMap<String, String>);

impl Info {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    pub fn pid(&self) -> Option<u32> {
        self.get("Pid")?.parse().ok()
    }
    pub fn uptime_sec(&self) -> Option<u64> {
        self.get("Uptime_sec")?.parse().ok()
    }
    /// A process on its way out (after a reload): what it says is not the current state.
    pub fn stopping(&self) -> bool {
        self.get("Stopping") == Some("1")
    }
}

pub fn parse_info(reply: &str) -> Result<Info, Malformed> {
    let map: BTreeMap<String, String> = reply
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    if !map.contains_key("Pid") {
        return Err(malformed("show info", "no Pid"));
    }
    Ok(Info(map))
}

/// The admin state bit mask of `show servers state` (decimal on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminState(pub u32);

impl AdminState {
    pub const FORCED_MAINT: u32 = 0x01;
    pub const INHERITED_MAINT: u32 = 0x02;
    pub const CONFIG_MAINT: u32 = 0x04;
    pub const FORCED_DRAIN: u32 = 0x08;
    pub const INHERITED_DRAIN: u32 = 0x10;
    pub const RESOLUTION_MAINT: u32 = 0x20;

    pub fn maint(self) -> bool {
        self.0
            & (Self::FORCED_MAINT
                | Self::INHERITED_MAINT
                | Self::CONFIG_MAINT
                | Self::RESOLUTION_MAINT)
            != 0
    }
    pub fn drain(self) -> bool {
        self.0 & (Self::FORCED_DRAIN | Self::INHERITED_DRAIN) != 0
    }
    /// The state an action can ask for that this mask is (maintenance wins over drain, as
    /// in HAProxy).
    pub fn state(self) -> checkplane_wire::haproxy::ServerState {
        use checkplane_wire::haproxy::ServerState;
        if self.maint() {
            ServerState::Maint
        } else if self.drain() {
            ServerState::Drain
        } else {
            ServerState::Ready
        }
    }

    /// [`AdminState::state`]'s name: `maint`, `drain` or `ready`.
    pub fn name(self) -> &'static str {
        self.state().as_str()
    }
}

/// The operational state (`srv_op_state`).
pub fn op_state_name(op: u32) -> &'static str {
    match op {
        0 => "stopped",
        1 => "starting",
        2 => "running",
        3 => "stopping",
        _ => "unknown",
    }
}

/// One line of `show servers state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub backend_id: u32,
    pub backend: String,
    pub server_id: u32,
    pub server: String,
    pub address: String,
    pub port: Option<u16>,
    pub op_state: u32,
    pub admin_state: AdminState,
    pub weight: u32,
    pub check_status: u32,
}

/// Columns a format-1 reply has at least and at most.
const MIN_COLUMNS: usize = 20;
const MAX_COLUMNS: usize = 25;

pub fn parse_servers_state(reply: &str) -> Result<Vec<ServerState>, Malformed> {
    const C: &str = "show servers state";
    let mut lines = reply.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        Some(other) => {
            return Err(malformed(
                C,
                format!(
                    "format {:?}, expected 1",
                    other.chars().take(20).collect::<String>()
                ),
            ))
        }
        None => return Err(malformed(C, "empty")),
    }
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| malformed(C, "no # header"))?;
    let names: Vec<&str> = header.split_whitespace().collect();
    if !(MIN_COLUMNS..=MAX_COLUMNS).contains(&names.len()) {
        return Err(malformed(
            C,
            format!("{} columns, expected 20-25", names.len()),
        ));
    }
    let at = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| malformed(C, format!("no {name} column")))
    };
    let idx = [
        at("be_id")?,
        at("be_name")?,
        at("srv_id")?,
        at("srv_name")?,
        at("srv_addr")?,
        at("srv_op_state")?,
        at("srv_admin_state")?,
        at("srv_uweight")?,
        at("srv_check_status")?,
    ];
    let port_at = names.iter().position(|n| *n == "srv_port");
    let mut out = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != names.len() {
            return Err(malformed(
                C,
                format!(
                    "a line of {} fields under {} columns",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        let num = |i: usize, what: &str| {
            fields[i]
                .parse::<u32>()
                .map_err(|_| malformed(C, format!("{what} {:?} is not a number", fields[i])))
        };
        out.push(ServerState {
            backend_id: num(idx[0], "be_id")?,
            backend: fields[idx[1]].to_owned(),
            server_id: num(idx[2], "srv_id")?,
            server: fields[idx[3]].to_owned(),
            address: fields[idx[4]].to_owned(),
            port: port_at.and_then(|i| fields[i].parse().ok()),
            op_state: num(idx[5], "srv_op_state")?,
            admin_state: AdminState(num(idx[6], "srv_admin_state")?),
            weight: num(idx[7], "srv_uweight")?,
            check_status: num(idx[8], "srv_check_status")?,
        });
    }
    Ok(out)
}

/// One row of `show stat`, by column name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatRow(pub BTreeMap<String, String>);

impl StatRow {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
    pub fn proxy(&self) -> &str {
        self.get("pxname").unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.get("svname").unwrap_or_default()
    }
    /// Current sessions.
    pub fn scur(&self) -> Option<u64> {
        self.get("scur")?.parse().ok()
    }
    pub fn status(&self) -> Option<&str> {
        self.get("status")
    }
}

pub fn parse_stat(reply: &str) -> Result<Vec<StatRow>, Malformed> {
    const C: &str = "show stat";
    let mut lines = reply.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| malformed(C, "no # header"))?;
    let names: Vec<&str> = header.split(',').collect();
    if !names.contains(&"pxname") || !names.contains(&"svname") {
        return Err(malformed(C, "no pxname/svname columns"));
    }
    let mut rows = Vec::new();
    for line in lines {
        let values: Vec<&str> = line.split(',').collect();
        // Rows end with a trailing comma like the header; a row may not have more fields.
        if values.len() > names.len() {
            return Err(malformed(C, "a row longer than the header"));
        }
        rows.push(StatRow(
            names
                .iter()
                .zip(values)
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, v)| ((*n).to_owned(), v.to_owned()))
                .collect(),
        ));
    }
    Ok(rows)
}

/// What HAProxy says of one server: its `show servers state` line and, when read, its
/// `show stat` row (status, check and sessions).
pub fn observed(state: &ServerState, stat: Option<&StatRow>) -> ObservedServer {
    ObservedServer {
        address: state.address.clone(),
        port: state.port,
        weight: state.weight,
        op_state: op_state_name(state.op_state).to_owned(),
        admin_state: state.admin_state.name().to_owned(),
        admin_bits: state.admin_state.0,
        status: stat.and_then(|r| r.status()).map(str::to_owned),
        check_status: stat.and_then(|r| r.get("check_status")).map(str::to_owned),
        scur: stat.and_then(|r| r.scur()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Debian's HAProxy 2.6 prints it (HAPROXY-NOTES.md).
    pub const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 be 1 s1 127.0.0.1 2 0 1 1 2 6 3 4 6 0 0 0 - 18101 - 0 0 - - 0\n3 be 2 s2 127.0.0.1 0 16 50 50 21 8 2 0 6 0 0 0 - 18102 - 0 0 - - 0\n\n";

    #[test]
    fn servers_state_is_read_by_header_names() {
        let servers = parse_servers_state(STATE).unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].server, "s1");
        assert_eq!(servers[0].port, Some(18101));
        assert_eq!(op_state_name(servers[0].op_state), "running");
        assert_eq!(servers[1].weight, 50);
        // 16 is inherited drain, in decimal: drain, not maintenance.
        assert_eq!(servers[1].admin_state.name(), "drain");
        assert!(!servers[1].admin_state.maint());
    }

    #[test]
    fn columns_may_move_and_number_20_to_25() {
        // The same data with two columns swapped and the last five gone.
        let swapped = STATE
            .replace("be_id be_name", "be_name be_id")
            .replace("3 be 1 s1", "be 3 1 s1")
            .replace("3 be 2 s2", "be 3 2 s2");
        let cut: String = swapped
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() > 5 {
                    f[..f.len() - 5].join(" ")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let servers = parse_servers_state(&cut).unwrap();
        assert_eq!(
            (servers[0].backend.as_str(), servers[0].backend_id),
            ("be", 3)
        );
        assert_eq!(servers[0].port, Some(18101));
        // Too few columns, another format, a short line: errors, not guesses.
        let few: String = cut
            .lines()
            .map(|l| l.split_whitespace().take(10).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_servers_state(&few).is_err());
        assert!(parse_servers_state(&STATE.replacen('1', "2", 1)).is_err());
        let short = STATE.replace(" 18102 - 0 0 - - 0", "");
        assert!(parse_servers_state(&short).is_err());
    }

    #[test]
    fn admin_state_bits() {
        assert_eq!(AdminState(0).name(), "ready");
        assert_eq!(AdminState(8).name(), "drain");
        assert_eq!(AdminState(1).name(), "maint");
        assert_eq!(AdminState(9).name(), "maint");
        assert_eq!(AdminState(0x20).name(), "maint");
        assert_eq!(AdminState(0x10).name(), "drain");
    }

    #[test]
    fn stat_and_info_by_name() {
        let stat = "# pxname,svname,qcur,qmax,scur,smax,status,weight,\nbe,s1,0,0,3,5,DRAIN,1,\nbe,BACKEND,0,0,3,5,UP,1,\n";
        let rows = parse_stat(stat).unwrap();
        assert_eq!(rows[0].proxy(), "be");
        assert_eq!(rows[0].name(), "s1");
        assert_eq!(rows[0].scur(), Some(3));
        assert_eq!(rows[0].status(), Some("DRAIN"));
        let info =
            parse_info("Name: HAProxy\nVersion: 2.6.12\nPid: 42\nUptime_sec: 7\nStopping: 0\n")
                .unwrap();
        assert_eq!(
            (info.pid(), info.uptime_sec(), info.stopping()),
            (Some(42), Some(7), false)
        );
        assert!(parse_info("nothing here").is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn cut_and_flipped(base: &'static str) -> impl Strategy<Value = String> {
            (
                0..=base.len(),
                proptest::collection::vec((0..base.len(), any::<char>()), 0..4),
            )
                .prop_map(move |(cut, flips)| {
                    let mut chars: Vec<char> = base.chars().collect();
                    for (at, c) in flips {
                        if at < chars.len() {
                            chars[at] = c;
                        }
                    }
                    chars.into_iter().take(cut).collect()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            #[test]
            fn random_replies_never_panic(reply in ".{0,400}") {
                let _ = parse_servers_state(&reply);
                let _ = parse_stat(&reply);
                let _ = parse_info(&reply);
            }

            #[test]
            fn truncated_and_altered_replies_never_panic(reply in cut_and_flipped(STATE)) {
                if let Ok(servers) = parse_servers_state(&reply) {
                    for s in servers { let _ = s.admin_state.name(); }
                }
                let _ = parse_stat(&reply);
            }
        }
    }
}
