//! The workload in Cedar: one `PolicySet` per route (a `permit` with the allow
//! criteria as a `when` clause, plus a `forbid` for the deny rule), users and groups
//! as entities in one shared store (`principal in [Group::...]`), everything else in
//! the request context. The time of day is given precomputed in the route's zone.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, RestrictedExpression,
};

use crate::workload::{Criterion, Deny, Route, Workload};

fn group_list(w: &Workload, gs: &[u32]) -> String {
    gs.iter()
        .map(|g| format!("Group::\"{}\"", w.groups[*g as usize]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn str_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Cedar policies of a route.
pub fn policy_text(w: &Workload, route: &Route) -> String {
    let conds: Vec<String> = route
        .allow
        .iter()
        .map(|c| match c {
            Criterion::Groups(gs) => format!("principal in [{}]", group_list(w, gs)),
            Criterion::Domain(ds) => format!(
                "[{}].contains(context.domain)",
                str_list(ds.iter().map(|d| w.domains[*d].as_str()))
            ),
            Criterion::Managed => {
                "context.device.fresh_until > context.now && context.device.managed".to_owned()
            }
            Criterion::DiskEncrypted => {
                "context.device.fresh_until > context.now && context.device.disk_encrypted"
                    .to_owned()
            }
            Criterion::Method(ms) => {
                format!(
                    "[{}].contains(context.method)",
                    str_list(ms.iter().copied())
                )
            }
            Criterion::PathPrefix(p) => format!("context.path like \"{p}*\""),
            Criterion::SourceIp(nets) => format!(
                "({})",
                nets.iter()
                    .map(|n| format!("context.ip.isInRange(ip(\"{}\"))", n.cidr()))
                    .collect::<Vec<_>>()
                    .join(" || ")
            ),
            Criterion::TimeOfDay { after, before, .. } if after < before => {
                format!("context.local_time >= {after} && context.local_time < {before}")
            }
            Criterion::TimeOfDay { after, before, .. } => {
                format!("(context.local_time >= {after} || context.local_time < {before})")
            }
        })
        .collect();
    let mut text = format!(
        "permit (principal, action, resource)\nwhen {{\n  {}\n}};\n",
        conds.join("\n  && ")
    );
    if let Some(d) = &route.deny {
        let cond = match d {
            Deny::Groups(gs) => format!("principal in [{}]", group_list(w, gs)),
            Deny::Method(ms) => {
                format!(
                    "[{}].contains(context.method)",
                    str_list(ms.iter().copied())
                )
            }
            Deny::PathPrefix(p) => format!("context.path like \"{p}*\""),
        };
        let _ = write!(
            text,
            "forbid (principal, action, resource)\nwhen {{ {cond} }};\n"
        );
    }
    text
}

/// Policy sets, the entity store and the authorizer.
pub struct CedarSide {
    authorizer: Authorizer,
    /// One policy set per route.
    pub sets: Vec<PolicySet>,
    entities: Entities,
}

fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
}

impl CedarSide {
    /// Parses every route's policies and loads users and groups as entities.
    pub fn build(w: &Workload) -> CedarSide {
        let sets = w
            .routes
            .iter()
            .map(|r| {
                let text = policy_text(w, r);
                PolicySet::from_str(&text).unwrap_or_else(|e| panic!("{text}\n{e}"))
            })
            .collect();
        let user_ty = EntityTypeName::from_str("User").expect("type name");
        let group_ty = EntityTypeName::from_str("Group").expect("type name");
        let groups = w
            .groups
            .iter()
            .map(|g| Entity::new_no_attrs(uid(&group_ty, g), HashSet::new()));
        let users = w.users.iter().map(|u| {
            let parents = u
                .groups
                .iter()
                .map(|g| uid(&group_ty, &w.groups[*g as usize]))
                .collect();
            Entity::new_no_attrs(uid(&user_ty, &u.name), parents)
        });
        let entities = Entities::from_entities(groups.chain(users), None).expect("entities");
        CedarSide {
            authorizer: Authorizer::new(),
            sets,
            entities,
        }
    }

    /// One request per input (principal, action, route as resource, context).
    pub fn requests(&self, w: &Workload) -> Vec<Request> {
        let user_ty = EntityTypeName::from_str("User").expect("type name");
        let route_ty = EntityTypeName::from_str("Route").expect("type name");
        let action_ty = EntityTypeName::from_str("Action").expect("type name");
        let action = uid(&action_ty, "access");
        w.inputs
            .iter()
            .map(|i| {
                let u = &w.users[i.user];
                let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
                let device = RestrictedExpression::new_record([
                    (
                        "managed".to_owned(),
                        RestrictedExpression::new_bool(i.managed),
                    ),
                    (
                        "disk_encrypted".to_owned(),
                        RestrictedExpression::new_bool(i.disk_encrypted),
                    ),
                    (
                        "fresh_until".to_owned(),
                        RestrictedExpression::new_long(i.posture_expires),
                    ),
                ])
                .expect("record");
                let context = Context::from_pairs([
                    ("domain".to_owned(), s(&w.domains[u.domain])),
                    ("now".to_owned(), RestrictedExpression::new_long(i.now)),
                    ("device".to_owned(), device),
                    ("method".to_owned(), s(i.method)),
                    ("path".to_owned(), s(&i.path)),
                    (
                        "ip".to_owned(),
                        RestrictedExpression::new_ip(i.ip.to_string()),
                    ),
                    (
                        "local_time".to_owned(),
                        RestrictedExpression::new_long(i64::from(i.local_time)),
                    ),
                ])
                .expect("context");
                Request::new(
                    uid(&user_ty, &u.name),
                    action.clone(),
                    uid(&route_ty, &w.routes[i.route].name),
                    context,
                    None,
                )
                .expect("request")
            })
            .collect()
    }

    /// Decides a request on route `route`.
    #[inline]
    pub fn decide(&self, route: usize, req: &Request) -> bool {
        self.authorizer
            .is_authorized(req, &self.sets[route], &self.entities)
            .decision()
            == Decision::Allow
    }
}
