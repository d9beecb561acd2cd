//! The deterministic workload: groups, users, routes with their policies (as plain
//! data every engine is generated from), and a mix of request inputs. A small model
//! evaluator gives the expected decision of each input, so the mix can be described
//! (allow fraction, which criterion denied) and every engine checked against it.

use std::net::Ipv4Addr;

use chrono::{NaiveDate, Offset, TimeZone};
use chrono_tz::Tz;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// The fixed seed: every run generates the same workload.
pub const SEED: u64 = 0x5649_4749_4c00_0002;

/// How big the workload is.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Routes, one policy each.
    pub routes: usize,
    /// Users.
    pub users: usize,
    /// Groups.
    pub groups: usize,
    /// Email domains users are spread over.
    pub domains: usize,
    /// Request inputs in the mix.
    pub inputs: usize,
}

impl Sizes {
    /// The sizes the issue asks for.
    pub const ISSUE: Sizes = Sizes {
        routes: 10_000,
        users: 100_000,
        groups: 5_000,
        domains: 50,
        inputs: 10_000,
    };
}

/// A user: an email at one domain and 1–20 groups.
#[derive(Debug, Clone)]
pub struct User {
    /// Id, e.g. `u123`.
    pub name: String,
    /// Email address (lowercase).
    pub email: String,
    /// Index of the email's domain.
    pub domain: usize,
    /// Group indices, ascending.
    pub groups: Vec<u32>,
}

/// An IPv4 network.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    /// Network address.
    pub addr: u32,
    /// Prefix length.
    pub len: u8,
}

impl Net {
    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    /// Whether the address is inside.
    pub fn contains(self, ip: u32) -> bool {
        ip & self.mask() == self.addr
    }

    /// CIDR notation.
    pub fn cidr(self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.addr), self.len)
    }
}

/// HTTP methods requests use.
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// One criterion of a route's allow rule.
#[derive(Debug, Clone)]
pub enum Criterion {
    /// `groups: {any_of: [...]}`.
    Groups(Vec<u32>),
    /// `domain: {in: [...]}` (domain indices).
    Domain(Vec<usize>),
    /// `device/managed: true` (posture must be fresh).
    Managed,
    /// `device/disk_encrypted: true` (posture must be fresh).
    DiskEncrypted,
    /// `http_method: {in: [...]}`.
    Method(Vec<&'static str>),
    /// `http_path: {starts_with: ...}`.
    PathPrefix(String),
    /// `source_ip: {in: [...]}`.
    SourceIp(Vec<Net>),
    /// `time_of_day: {tz, after, before}`, seconds since local midnight; wraps
    /// midnight when `after > before`.
    TimeOfDay {
        /// Zone.
        tz: Tz,
        /// First second inside.
        after: u32,
        /// First second outside.
        before: u32,
    },
}

/// Names of the criterion kinds, in the order policies list them.
pub const KINDS: [&str; 8] = [
    "groups",
    "domain",
    "device/managed",
    "device/disk_encrypted",
    "http_method",
    "http_path",
    "source_ip",
    "time_of_day",
];

impl Criterion {
    /// Index into [`KINDS`].
    pub fn kind(&self) -> usize {
        match self {
            Criterion::Groups(_) => 0,
            Criterion::Domain(_) => 1,
            Criterion::Managed => 2,
            Criterion::DiskEncrypted => 3,
            Criterion::Method(_) => 4,
            Criterion::PathPrefix(_) => 5,
            Criterion::SourceIp(_) => 6,
            Criterion::TimeOfDay { .. } => 7,
        }
    }
}

/// The one-criterion deny rule some routes have.
#[derive(Debug, Clone)]
pub enum Deny {
    /// Members of these groups are refused.
    Groups(Vec<u32>),
    /// These methods are refused.
    Method(Vec<&'static str>),
    /// Paths under this prefix are refused.
    PathPrefix(String),
}

impl Deny {
    /// Short name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Deny::Groups(_) => "deny groups",
            Deny::Method(_) => "deny http_method",
            Deny::PathPrefix(_) => "deny http_path",
        }
    }
}

/// A route and its policy.
#[derive(Debug, Clone)]
pub struct Route {
    /// Id, e.g. `r42`.
    pub name: String,
    /// Path prefix the route serves.
    pub base: String,
    /// The allow rule: all of these.
    pub allow: Vec<Criterion>,
    /// The optional deny rule.
    pub deny: Option<Deny>,
    /// Zone of the time criterion (UTC without one): peers get the local time there.
    pub tz: Tz,
}

/// One request to decide.
#[derive(Debug, Clone)]
pub struct Input {
    /// Route index.
    pub route: usize,
    /// User index.
    pub user: usize,
    /// Posture: managed.
    pub managed: bool,
    /// Posture: disk encrypted.
    pub disk_encrypted: bool,
    /// Posture report expiry (Unix seconds); stale when `now >= posture_expires`.
    pub posture_expires: i64,
    /// HTTP method.
    pub method: &'static str,
    /// Request path.
    pub path: String,
    /// Client address.
    pub ip: Ipv4Addr,
    /// Evaluation instant (Unix seconds).
    pub now: i64,
    /// Seconds since local midnight in the route's zone: what the peers are given
    /// instead of doing the zone conversion themselves.
    pub local_time: u32,
}

/// Why the model decided as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Allowed.
    Allow,
    /// The deny rule held.
    Denied(&'static str),
    /// The first allow criterion that failed (index into [`KINDS`]).
    NotAllowed(usize),
}

/// Everything generated.
#[derive(Debug)]
pub struct Workload {
    /// Sizes used.
    pub sizes: Sizes,
    /// Group names.
    pub groups: Vec<String>,
    /// Domain names.
    pub domains: Vec<String>,
    /// Users.
    pub users: Vec<User>,
    /// Users of each group.
    pub members: Vec<Vec<u32>>,
    /// Routes.
    pub routes: Vec<Route>,
    /// The input mix.
    pub inputs: Vec<Input>,
}

const ZONES: [Tz; 8] = [
    Tz::Europe__Paris,
    Tz::America__New_York,
    Tz::Asia__Tokyo,
    Tz::Europe__London,
    Tz::America__Los_Angeles,
    Tz::UTC,
    Tz::Asia__Kolkata,
    Tz::Australia__Sydney,
];

/// Seconds since local midnight in `tz` at `now`.
pub fn local_time(tz: Tz, now: i64) -> u32 {
    let utc = chrono::DateTime::from_timestamp(now, 0)
        .expect("generated instants are in range")
        .naive_utc();
    let offset = tz.offset_from_utc_datetime(&utc).fix().local_minus_utc();
    (now + i64::from(offset)).rem_euclid(86_400) as u32
}

/// Whether `t` is in the window (`before` exclusive; wraps when `after > before`).
pub fn in_window(t: u32, after: u32, before: u32) -> bool {
    if after < before {
        after <= t && t < before
    } else {
        t >= after || t < before
    }
}

/// `HH:MM` of a whole number of minutes.
pub fn clock(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3600, secs / 60 % 60)
}

impl Workload {
    /// Generates the workload from [`SEED`].
    pub fn generate(sizes: Sizes) -> Workload {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(SEED);
        let groups: Vec<String> = (0..sizes.groups).map(|g| format!("g{g}")).collect();
        let domains: Vec<String> = (0..sizes.domains)
            .map(|d| format!("d{d}.example.com"))
            .collect();
        let mut members = vec![Vec::new(); sizes.groups];
        let users: Vec<User> = (0..sizes.users)
            .map(|u| {
                let n = rng.random_range(1..=20usize).min(sizes.groups);
                let mut gs: Vec<u32> = rand::seq::index::sample(&mut rng, sizes.groups, n)
                    .into_iter()
                    .map(|g| g as u32)
                    .collect();
                gs.sort_unstable();
                for &g in &gs {
                    members[g as usize].push(u as u32);
                }
                let domain = rng.random_range(0..sizes.domains);
                User {
                    name: format!("u{u}"),
                    email: format!("u{u}@{}", domains[domain]),
                    domain,
                    groups: gs,
                }
            })
            .collect();
        let routes: Vec<Route> = (0..sizes.routes)
            .map(|r| gen_route(&mut rng, r, &sizes))
            .collect();
        let mut w = Workload {
            sizes,
            groups,
            domains,
            users,
            members,
            routes,
            inputs: Vec::new(),
        };
        w.inputs = (0..sizes.inputs).map(|_| gen_input(&mut rng, &w)).collect();
        w
    }

    /// Whether one allow criterion holds for an input.
    pub fn holds(&self, c: &Criterion, i: &Input) -> bool {
        let user = &self.users[i.user];
        let fresh = i.now < i.posture_expires;
        match c {
            Criterion::Groups(gs) => user.groups.iter().any(|g| gs.contains(g)),
            Criterion::Domain(ds) => ds.contains(&user.domain),
            Criterion::Managed => fresh && i.managed,
            Criterion::DiskEncrypted => fresh && i.disk_encrypted,
            Criterion::Method(ms) => ms.contains(&i.method),
            Criterion::PathPrefix(p) => i.path.starts_with(p.as_str()),
            Criterion::SourceIp(nets) => nets.iter().any(|n| n.contains(u32::from(i.ip))),
            Criterion::TimeOfDay { after, before, .. } => in_window(i.local_time, *after, *before),
        }
    }

    /// Whether a deny rule holds for an input.
    pub fn deny_holds(&self, d: &Deny, i: &Input) -> bool {
        match d {
            Deny::Groups(gs) => self.users[i.user].groups.iter().any(|g| gs.contains(g)),
            Deny::Method(ms) => ms.contains(&i.method),
            Deny::PathPrefix(p) => i.path.starts_with(p.as_str()),
        }
    }

    /// The model's decision: the deny rule first, then the allow criteria in order.
    pub fn outcome(&self, i: &Input) -> Outcome {
        let route = &self.routes[i.route];
        if let Some(d) = &route.deny {
            if self.deny_holds(d, i) {
                return Outcome::Denied(d.kind());
            }
        }
        match route.allow.iter().find(|c| !self.holds(c, i)) {
            Some(c) => Outcome::NotAllowed(c.kind()),
            None => Outcome::Allow,
        }
    }
}

fn pick<T: Copy>(rng: &mut Xoshiro256PlusPlus, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn distinct(rng: &mut Xoshiro256PlusPlus, len: usize, n: usize) -> Vec<usize> {
    let mut v = rand::seq::index::sample(rng, len, n.min(len)).into_vec();
    v.sort_unstable();
    v
}

fn gen_net(rng: &mut Xoshiro256PlusPlus) -> Net {
    match rng.random_range(0..3) {
        0 => Net {
            addr: u32::from(Ipv4Addr::new(10, rng.random_range(0..=255), 0, 0)),
            len: 16,
        },
        1 => Net {
            addr: u32::from(Ipv4Addr::new(
                172,
                rng.random_range(16..32),
                rng.random_range(0..=255),
                0,
            )),
            len: 24,
        },
        _ => Net {
            addr: u32::from(Ipv4Addr::new(
                198,
                51,
                rng.random_range(0..=255),
                rng.random_range(0..16u8) * 16,
            )),
            len: 28,
        },
    }
}

fn gen_route(rng: &mut Xoshiro256PlusPlus, r: usize, sizes: &Sizes) -> Route {
    let base = format!("/api/r{r}/");
    // Groups always, then 4-7 of the other seven kinds, listed in KINDS order.
    let k = rng.random_range(5..=8usize);
    let mut kinds: Vec<usize> = distinct(rng, 7, k - 1).into_iter().map(|x| x + 1).collect();
    kinds.insert(0, 0);
    let mut tz = Tz::UTC;
    let allow = kinds
        .into_iter()
        .map(|kind| match kind {
            0 => {
                let n = rng.random_range(1..=3);
                Criterion::Groups(
                    distinct(rng, sizes.groups, n)
                        .into_iter()
                        .map(|g| g as u32)
                        .collect(),
                )
            }
            1 => {
                let n = rng.random_range(1..=3);
                Criterion::Domain(distinct(rng, sizes.domains, n))
            }
            2 => Criterion::Managed,
            3 => Criterion::DiskEncrypted,
            4 => Criterion::Method(
                pick(
                    rng,
                    &[
                        &["GET"][..],
                        &["GET", "HEAD"],
                        &["GET", "POST"],
                        &["GET", "HEAD", "POST", "PUT", "PATCH"],
                    ],
                )
                .to_vec(),
            ),
            5 => Criterion::PathPrefix(base.clone()),
            6 => {
                let n = rng.random_range(1..=3);
                Criterion::SourceIp((0..n).map(|_| gen_net(rng)).collect())
            }
            _ => {
                tz = pick(rng, &ZONES);
                let quarter = 15 * 60;
                let (after, before) = if rng.random_bool(0.1) {
                    // A night shift window that wraps midnight.
                    (
                        rng.random_range(80..=92) * quarter,
                        rng.random_range(16..=32) * quarter,
                    )
                } else {
                    (
                        rng.random_range(20..=40) * quarter,
                        rng.random_range(64..=92) * quarter,
                    )
                };
                Criterion::TimeOfDay { tz, after, before }
            }
        })
        .collect();
    let deny = if rng.random_bool(0.3) {
        Some(match rng.random_range(0..3) {
            0 => Deny::Groups(vec![rng.random_range(0..sizes.groups as u32)]),
            1 => Deny::Method(vec!["DELETE"]),
            _ => Deny::PathPrefix(format!("{base}admin/")),
        })
    } else {
        None
    };
    Route {
        name: format!("r{r}"),
        base,
        allow,
        deny,
        tz,
    }
}

/// Each allow criterion is violated with this probability, independently.
const P_VIOLATE: f64 = 0.1;
/// A route's deny rule is triggered with this probability.
const P_DENY: f64 = 0.15;

fn gen_input(rng: &mut Xoshiro256PlusPlus, w: &Workload) -> Input {
    let route_idx = rng.random_range(0..w.routes.len());
    let route = &w.routes[route_idx];
    // Which criteria this input should satisfy.
    let want: Vec<bool> = route
        .allow
        .iter()
        .map(|_| !rng.random_bool(P_VIOLATE))
        .collect();
    let want_of = |kind: usize| {
        route
            .allow
            .iter()
            .zip(&want)
            .find(|(c, _)| c.kind() == kind)
            .map(|(_, w)| *w)
    };
    let deny_hit = route.deny.is_some() && rng.random_bool(P_DENY);

    // The user: best effort to match the wanted group, domain and deny-group outcomes.
    let groups_c = route.allow.iter().find_map(|c| match c {
        Criterion::Groups(gs) => Some(gs.as_slice()),
        _ => None,
    });
    let domain_c = route.allow.iter().find_map(|c| match c {
        Criterion::Domain(ds) => Some(ds.as_slice()),
        _ => None,
    });
    let deny_groups = match &route.deny {
        Some(Deny::Groups(gs)) => Some(gs.as_slice()),
        _ => None,
    };
    let want_groups = want_of(0);
    let want_domain = want_of(1);
    let mut user = 0usize;
    for _ in 0..1000 {
        let pool: Option<u32> = match (deny_groups, deny_hit, groups_c, want_groups) {
            (Some(d), true, _, _) => Some(pick(rng, d)),
            (_, _, Some(g), Some(true)) => Some(pick(rng, g)),
            _ => None,
        };
        user = match pool {
            Some(g) if !w.members[g as usize].is_empty() => {
                pick(rng, &w.members[g as usize]) as usize
            }
            _ => rng.random_range(0..w.users.len()),
        };
        let u = &w.users[user];
        let in_any = |gs: &[u32]| u.groups.iter().any(|g| gs.contains(g));
        let ok_groups = match (groups_c, want_groups) {
            (Some(g), Some(want)) => in_any(g) == want,
            _ => true,
        };
        let ok_domain = match (domain_c, want_domain) {
            (Some(d), Some(want)) => d.contains(&u.domain) == want,
            _ => true,
        };
        let ok_deny = deny_groups.is_none_or(|d| in_any(d) == deny_hit);
        if ok_groups && ok_domain && ok_deny {
            break;
        }
    }

    // The instant: inside or outside the time window, any day of 2026.
    let day = rng.random_range(0..365u32);
    let date = NaiveDate::from_yo_opt(2026, day + 1).expect("a day of 2026");
    let now = loop {
        let t: u32 = match route.allow.iter().find_map(|c| match c {
            Criterion::TimeOfDay { after, before, .. } => Some((*after, *before)),
            _ => None,
        }) {
            Some((after, before)) => {
                let want = want_of(7).unwrap_or(true);
                loop {
                    let t = rng.random_range(0..86_400u32);
                    if in_window(t, after, before) == want {
                        break t;
                    }
                }
            }
            None => rng.random_range(0..86_400u32),
        };
        let naive = date
            .and_hms_opt(t / 3600, t / 60 % 60, t % 60)
            .expect("a valid clock time");
        // Local times in a DST gap do not exist: draw again.
        if let Some(dt) = route.tz.from_local_datetime(&naive).earliest() {
            break dt.timestamp();
        }
    };

    let stale = rng.random_bool(0.03);
    let posture_expires = if stale {
        now - rng.random_range(1..86_400)
    } else {
        now + rng.random_range(1..86_400)
    };
    let managed = want_of(2).unwrap_or_else(|| rng.random_bool(0.8));
    let disk_encrypted = want_of(3).unwrap_or_else(|| rng.random_bool(0.8));

    let deny_method = matches!(route.deny, Some(Deny::Method(_)));
    let method = if deny_method && deny_hit {
        "DELETE"
    } else {
        let ms = route.allow.iter().find_map(|c| match c {
            Criterion::Method(ms) => Some(ms.as_slice()),
            _ => None,
        });
        loop {
            let m = match ms {
                Some(ms) if want_of(4) == Some(true) => pick(rng, ms),
                Some(_) => pick(rng, &METHODS),
                None => pick(rng, &["GET", "GET", "POST", "PUT", "DELETE"]),
            };
            let ok_allow = match ms {
                Some(ms) => ms.contains(&m) == want_of(4).unwrap_or(true),
                None => true,
            };
            if ok_allow && !(deny_method && m == "DELETE") {
                break m;
            }
        }
    };

    let deny_path = matches!(route.deny, Some(Deny::PathPrefix(_)));
    let path = if deny_path && deny_hit {
        format!("{}admin/users/{}", route.base, rng.random_range(0..1000))
    } else if want_of(5) == Some(false) {
        if rng.random_bool(0.5) {
            format!(
                "/api/r{}/items/{}",
                rng.random_range(0..w.routes.len()) + w.routes.len(),
                rng.random_range(0..1000)
            )
        } else {
            "/healthz".to_owned()
        }
    } else {
        format!("{}items/{}", route.base, rng.random_range(0..1000))
    };

    let nets = route.allow.iter().find_map(|c| match c {
        Criterion::SourceIp(n) => Some(n.as_slice()),
        _ => None,
    });
    let ip = match (nets, want_of(6)) {
        (Some(nets), Some(true)) => {
            let n = pick(rng, nets);
            Ipv4Addr::from(n.addr | (rng.random::<u32>() & !n.mask()))
        }
        (Some(nets), _) => loop {
            let ip = if rng.random_bool(0.5) {
                u32::from(Ipv4Addr::new(10, 0, 0, 0)) | (rng.random::<u32>() & 0x00ff_ffff)
            } else {
                rng.random::<u32>()
            };
            if !nets.iter().any(|n| n.contains(ip)) {
                break Ipv4Addr::from(ip);
            }
        },
        (None, _) => Ipv4Addr::from(rng.random::<u32>()),
    };

    Input {
        route: route_idx,
        user,
        managed,
        disk_encrypted,
        posture_expires,
        method,
        path,
        ip,
        now,
        local_time: local_time(route.tz, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_mixed() {
        let sizes = Sizes {
            routes: 200,
            users: 2_000,
            groups: 300,
            domains: 20,
            inputs: 1_000,
        };
        let a = Workload::generate(sizes);
        let b = Workload::generate(sizes);
        assert_eq!(a.inputs.len(), 1_000);
        for (x, y) in a.inputs.iter().zip(&b.inputs) {
            assert_eq!(
                (x.route, x.user, x.now, &x.path),
                (y.route, y.user, y.now, &y.path)
            );
        }
        let allowed = a
            .inputs
            .iter()
            .filter(|i| a.outcome(i) == Outcome::Allow)
            .count();
        assert!((300..700).contains(&allowed), "allowed {allowed} of 1000");
        for r in &a.routes {
            assert!((5..=8).contains(&r.allow.len()));
        }
    }
}
