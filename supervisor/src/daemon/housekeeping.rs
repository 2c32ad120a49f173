//! What the loop does on its timers: metrics, health checks, listeners re-armed.

use crate::config::RunConfig;
use crate::daemon::io::listeners::{ListenAddr, Listener};
use crate::daemon::io::metrics::Present;
use crate::sys;
use baton_machine::Machine;
use std::time::{Duration, Instant};

use super::{Driver, LoopEvent};

/// Sets the metrics' gauges from the machine, when something changed.
pub(super) fn refresh_metrics(m: &Machine, d: &mut Driver) {
    if !std::mem::take(&mut d.metrics_dirty) {
        return;
    }
    let now = Instant::now();
    let probation = m.on_probation().map(|(v, until, _)| {
        (
            v.as_str(),
            until.map(|t| t.saturating_duration_since(now).as_secs_f64()),
        )
    });
    let present = Present {
        active: m.active().unwrap_or(0),
        phases: m.gens().map(|(_, g)| g.phase).collect(),
        connections: d
            .handles
            .iter()
            .filter_map(|(id, h)| h.connections().map(|c| (*id, c)))
            .collect(),
        probation,
        permanent: m.permanent_image().map(String::as_str),
    };
    d.metrics.set_present(&present);
}

/// Starts a health check of the generation on probation, unless one runs.
pub(super) fn start_health_check(m: &Machine, d: &mut Driver, cfg: &RunConfig) {
    let (Some(check), Some(gen_id)) = (cfg.release.health.clone(), m.probation_generation()) else {
        return;
    };
    if d.health_running {
        return;
    }
    let Some(g) = m.generation(gen_id) else {
        return;
    };
    let exe = d.images.get(&g.image);
    let vars = crate::release::health::Vars {
        exe: exe
            .map(|e| e.path.display().to_string())
            .unwrap_or_default(),
        version: g.image.clone(),
        dir: exe
            .and_then(|e| e.release.as_ref())
            .map(|(_, dir)| dir.display().to_string())
            .unwrap_or_default(),
        pid: g.pid.to_string(),
    };
    let timeout = cfg.release.health_interval.max(Duration::from_secs(1));
    let tx = d.loop_tx.clone();
    d.health_running = true;
    tokio::spawn(async move {
        let result = check.run(&vars, timeout).await;
        let _ = tx.send(LoopEvent::Health { gen_id, result });
    });
}

pub(super) fn rearm_listeners(listeners: &[Listener], backlog: i32) {
    for l in listeners {
        // A datagram socket never listens; there is nothing to re-arm.
        if !l.addr.is_datagram() && !sys::is_listening(l.fd()) {
            match sys::relisten(l.fd(), backlog) {
                Ok(()) => match sys::inspect_listener(l.fd()) {
                    Ok(sys::SocketKind::Tcp(now)) if ListenAddr::Tcp(now) != l.addr => {
                        // The kernel drops an auto-assigned port on shutdown().
                        tracing::error!(name = %l.name, was = %l.addr, now = %now, "a child shut down listener; re-armed it, but on another port (bind an explicit port to avoid this)");
                    }
                    _ => tracing::warn!(name = %l.name, "a child shut down listener; re-armed it"),
                },
                Err(e) => {
                    tracing::error!(name = %l.name, error = %e, "listener stopped listening and cannot be re-armed")
                }
            }
        }
    }
}
