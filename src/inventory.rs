//! `cpuguard inventory` (in `cpuguard-libvirt`, the only program that links libvirt): this
//! host's running (or all) domains with their stamps and canonical CPU configurations, read
//! through the libvirt API, as one JSON bundle for `cpuguard fingerprint measure` and
//! `cpuguard plan`.

use virt::connect::Connect;
use virt::sys;

use crate::plan::{Inventory, InventoryDomain, INVENTORY_FORMAT, INVENTORY_VERSION};

/// Reads every running domain (or, with `all`, every defined one) of `uri`. A domain whose XML
/// cannot be read is named in the returned warnings and left out.
pub fn take(uri: &str, all: bool, hostname: &str) -> Result<(Inventory, Vec<String>), String> {
    // baseline's connect: an event loop for the embedded driver, errors reported once.
    let conn = crate::baseline::connect(uri).map_err(|e| e.to_string())?;
    let flags = if all {
        0
    } else {
        sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE
    };
    let domains = list(&conn, flags).map_err(|e| format!("{uri}: cannot list domains: {e}"))?;
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for dom in &domains {
        let name = dom.name().unwrap_or_else(|_| "(unnamed)".to_string());
        let running = dom.is_active().unwrap_or(false);
        // The live XML of a running domain carries the stamp and the CPU QEMU really runs.
        let xml = match dom.xml_desc(0) {
            Ok(x) => x,
            Err(e) => {
                warnings.push(format!("domain {name}: cannot read its XML: {e}"));
                continue;
            }
        };
        match InventoryDomain::from_xml(&xml, running) {
            Ok(d) => out.push(d),
            Err(e) => warnings.push(format!("domain {name}: {e}")),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    // The source's own CPU, for the baseline `cpuguard plan` computes for VMs that cannot move.
    let host_cpu = conn
        .domain_capabilities(None, None, None, None, 0)
        .map_err(|e| e.to_string())
        .and_then(|xml| crate::baseline::parse_host(&xml, uri).map_err(|e| e.to_string()));
    let host_cpu = match host_cpu {
        Ok(cpu) => Some(cpu),
        Err(e) => {
            warnings.push(format!(
                "no host CPU recorded ({uri}: domain capabilities: {e}): `cpuguard plan` will print the baseline command instead"
            ));
            None
        }
    };
    Ok((
        Inventory {
            format: INVENTORY_FORMAT.to_string(),
            version: INVENTORY_VERSION,
            hostname: hostname.to_string(),
            taken_at: crate::stamp::rfc3339_now(),
            host_cpu,
            domains: out,
        },
        warnings,
    ))
}

fn list(conn: &Connect, flags: u32) -> Result<Vec<virt::domain::Domain>, virt::error::Error> {
    conn.list_all_domains(flags)
}
