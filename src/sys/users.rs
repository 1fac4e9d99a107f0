//! The one user/group lookup drove makes: worker credentials
//! (`worker.user`/`worker.group`), socket owners (`listen.socket_user`/
//! `listen.socket_group`), and `droved --check`, which must refuse exactly
//! what start-up would refuse.
//!
//! A spec is a name or a numeric id, as systemd's User=/Group= take them;
//! either way it must exist in the account database (NSS), so a typo'd id
//! fails as clearly as a typo'd name.

use std::io;

use nix::unistd::{Gid, Group, Uid, User};

/// Looks up a user by name or numeric uid.
pub fn lookup_user(spec: &str) -> io::Result<User> {
    let found = match spec.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(spec),
    };
    found
        .map_err(io::Error::from)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no such user: {spec}")))
}

/// Looks up a group by name or numeric gid.
pub fn lookup_group(spec: &str) -> io::Result<Gid> {
    let found = match spec.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(spec),
    };
    found
        .map_err(io::Error::from)?
        .map(|g| g.gid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no such group: {spec}")))
}

/// The account database's entry for `uid`, if it has one.
pub fn account(uid: Uid) -> io::Result<Option<User>> {
    User::from_uid(uid).map_err(io::Error::from)
}

/// Whether the user `uid` is in group `gid`, as primary group or by the
/// account database's group list (getgrouplist(3)). A uid without an
/// account is in no group. Reads NSS: may block (LDAP, sssd).
pub fn is_member(uid: Uid, gid: Gid) -> io::Result<bool> {
    let Some(user) = User::from_uid(uid).map_err(io::Error::from)? else {
        return Ok(false);
    };
    if user.gid == gid {
        return Ok(true);
    }
    let name = std::ffi::CString::new(user.name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).map_err(io::Error::from)?;
    Ok(groups.contains(&gid))
}

/// The owner a socket file gets (`listen.socket_user`, `listen.socket_group`):
/// `None` when neither is set, else the ids to change (`None` keeps that one).
pub type SocketOwner = Option<(Option<Uid>, Option<Gid>)>;

/// Resolves `listen.socket_user`/`listen.socket_group`; the error names the key.
pub fn socket_owner(user: Option<&str>, group: Option<&str>) -> io::Result<SocketOwner> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let with_key = |key: &str, e: io::Error| io::Error::new(e.kind(), format!("{key}: {e}"));
    let uid = user
        .map(|u| lookup_user(u).map(|u| u.uid))
        .transpose()
        .map_err(|e| with_key("listen.socket_user", e))?;
    let gid = group
        .map(lookup_group)
        .transpose()
        .map_err(|e| with_key("listen.socket_group", e))?;
    Ok(Some((uid, gid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numeric_ids_resolve_alike() {
        assert_eq!(lookup_user("root").unwrap().uid.as_raw(), 0);
        assert_eq!(lookup_user("0").unwrap().name, "root");
        assert_eq!(lookup_group("0").unwrap().as_raw(), 0);
        assert_eq!(lookup_group("root").unwrap().as_raw(), 0);
        let e = lookup_user("no-such-user-drove").unwrap_err();
        assert_eq!(e.to_string(), "no such user: no-such-user-drove");
        assert!(lookup_group("no-such-group-drove").is_err());
        // An id without an account is refused like an unknown name.
        assert!(lookup_user("4000000000").is_err());
    }

    #[test]
    fn group_membership() {
        let root = Uid::from_raw(0);
        assert!(is_member(root, Gid::from_raw(0)).unwrap());
        let nogroup = lookup_group("nogroup").unwrap();
        assert!(!is_member(root, nogroup).unwrap());
        assert!(is_member(Uid::from_raw(65534), nogroup).unwrap());
        assert!(!is_member(Uid::from_raw(4_000_000_000), Gid::from_raw(0)).unwrap());
    }

    #[test]
    fn socket_owner_names_the_key() {
        assert_eq!(socket_owner(None, None).unwrap(), None);
        assert_eq!(
            socket_owner(Some("0"), None).unwrap(),
            Some((Some(Uid::from_raw(0)), None))
        );
        assert_eq!(
            socket_owner(None, Some("0")).unwrap(),
            Some((None, Some(Gid::from_raw(0))))
        );
        let e = socket_owner(Some("no-such-user-drove"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listen.socket_user: no such user: no-such-user-drove"
        );
        let e = socket_owner(None, Some("no-such-group-drove")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listen.socket_group: no such group: no-such-group-drove"
        );
    }
}
