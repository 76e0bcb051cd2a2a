//! Host names to addresses, for every outgoing connection of the agent: the
//! collector, and `tcp` and `http` checks.
//!
//! The glibc build asks `getaddrinfo`, which goes through NSS: whatever
//! `/etc/nsswitch.conf` lists (files, DNS, `mdns4_minimal` for the `.local`
//! names boards on a LAN are often reached by, systemd-resolved, LDAP...).
//!
//! The static (musl) build, the one the packages ship, has no NSS: musl's
//! own resolver reads `/etc/hosts` and DNS only. So it asks the system's NSS
//! through `getent ahosts NAME` (glibc's `libc-bin`, Essential on Debian and
//! Raspberry Pi OS): an argv, never a shell, with a name from the agent's
//! own config. The answer is then exactly what a glibc program on that board
//! would get. Only where `getent` does not exist (a musl system, say) does
//! the agent fall back to musl's resolver.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

/// The program that answers through the system's NSS.
#[cfg(target_env = "musl")]
const GETENT: &str = "getent";

/// Addresses of `host` (a name, or an IP address without brackets), in the
/// order the resolver gave them.
pub async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    #[cfg(target_env = "musl")]
    if let Some(found) = getent(GETENT, host, port).await? {
        return Ok(found);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}

/// Connects to the first address of `host` that accepts, as
/// `TcpStream::connect` does, through [`lookup`].
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in lookup(host, port).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| not_found(host, "no addresses")))
}

/// `getent ahosts HOST` through `program`: `Ok(None)` when the program does
/// not exist (then the caller falls back), an error when the name is
/// unknown.
#[cfg_attr(not(target_env = "musl"), allow(dead_code))]
async fn getent(program: &str, host: &str, port: u16) -> io::Result<Option<Vec<SocketAddr>>> {
    // A name can't start with '-'; refuse what getent would take as an option.
    if host.is_empty() || host.starts_with('-') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{host}` is not a host name")));
    }
    let out = tokio::process::Command::new(program)
        .arg("ahosts")
        .arg(host)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot run {program} to resolve {host}: {e}"))),
    };
    // getent: 0 found, 2 not found; anything else is its own failure.
    // 127 is "no such program" where the spawn itself can't tell (qemu-user
    // runs the exec in a child of its own): fall back, as for NotFound.
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Err(not_found(host, "unknown host")),
        Some(127) => return Ok(None),
        _ => return Err(not_found(host, &format!("{program} ahosts failed ({})", out.status))),
    }
    let found = parse_ahosts(&String::from_utf8_lossy(&out.stdout), port);
    if found.is_empty() {
        return Err(not_found(host, "no addresses"));
    }
    Ok(Some(found))
}

/// The stream addresses of `getent ahosts` output (`ADDRESS STREAM name`,
/// then `DGRAM` and `RAW` lines for the same address), in order, once each.
fn parse_ahosts(out: &str, port: u16) -> Vec<SocketAddr> {
    let mut found: Vec<SocketAddr> = Vec::new();
    for line in out.lines() {
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(kind)) = (fields.next(), fields.next()) else { continue };
        if kind != "STREAM" {
            continue;
        }
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let sa = SocketAddr::new(ip, port);
            if !found.contains(&sa) {
                found.push(sa);
            }
        }
    }
    found
}

fn not_found(host: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ahosts_output_gives_stream_addresses_in_order_once() {
        let out = "192.168.1.5     STREAM collector.local\n\
                   192.168.1.5     DGRAM  \n\
                   192.168.1.5     RAW    \n\
                   fe80::1         STREAM \n\
                   fe80::1         DGRAM  \n\
                   192.168.1.5     STREAM \n\
                   garbage\n\
                   not-an-ip       STREAM \n";
        let got = parse_ahosts(out, 8443);
        assert_eq!(got, vec!["192.168.1.5:8443".parse().unwrap(), "[fe80::1]:8443".parse().unwrap()]);
    }

    #[tokio::test]
    async fn getent_resolves_through_nss() {
        // The real getent of this machine (libc-bin): /etc/hosts has localhost.
        let Some(found) = getent("getent", "localhost", 443).await.unwrap() else {
            panic!("getent is part of libc-bin and should exist here");
        };
        assert!(!found.is_empty() && found.iter().all(|a| a.ip().is_loopback() && a.port() == 443), "{found:?}");
    }

    #[tokio::test]
    async fn getent_exit_codes_become_errors_that_name_the_host() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, script: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path.to_str().unwrap().to_string()
        };
        // getent's "not found" is exit status 2.
        let unknown = fake("unknown", "exit 2");
        let err = getent(&unknown, "collector.local", 443).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("collector.local: unknown host"), "{err}");
        let broken = fake("broken", "exit 1");
        let err = getent(&broken, "collector.local", 443).await.unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
        let empty = fake("empty", "exit 0");
        assert!(getent(&empty, "collector.local", 443).await.is_err());
        let answers = fake("answers", "echo \"10.1.2.3      STREAM $2\"; echo \"10.1.2.3      DGRAM\"");
        let found = getent(&answers, "collector.local", 443).await.unwrap().unwrap();
        assert_eq!(found, vec!["10.1.2.3:443".parse().unwrap()]);
    }

    #[tokio::test]
    async fn a_missing_getent_means_fall_back_and_options_are_refused() {
        assert!(getent("/nonexistent/getent", "localhost", 1).await.unwrap().is_none());
        let err = getent("getent", "-s", 1).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn ip_literals_are_not_looked_up() {
        assert_eq!(lookup("::1", 9).await.unwrap(), vec!["[::1]:9".parse().unwrap()]);
        assert_eq!(lookup("10.0.0.1", 9).await.unwrap(), vec!["10.0.0.1:9".parse().unwrap()]);
    }
}
