//! Every Redis key, in one place (`schemas/redis-keys.md`). A hash tag picks each key's
//! cluster slot: an owner's networks, passphrases and nodes share `{own:<owner>}`, so
//! a registration (consume a passphrase, write the node) is one script in one slot; a
//! pubkey device and its used nonces share `{dev:<hex>}`. Two small indexes in slots of
//! their own lead from what a request names to the owner's slot: a network id to its
//! owner, a node id to its owner. They are written outside the scripts (claimed with
//! NX before a network or a requested node id is made, set after a fresh node is made)
//! and never change while their network or node lives.

use uuid::Uuid;

use crate::core::ids::DeviceId;

/// The owner of network `<id>`: a string. Its uniqueness is the network id's.
pub fn network_owner(network: &str) -> String {
    format!("rg:{{net:{network}}}")
}

/// SCAN pattern of every [`network_owner`] key (those keys end in `}`; no other does).
pub const NETWORK_OWNERS: &str = "rg:{net:*}";

/// The owner of node `<uuid>`: a string.
pub fn node_owner(node: Uuid) -> String {
    format!("rg:{{node:{}}}", node.hyphenated())
}

/// The keys of one owner's slot.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a>(pub &'a str);

impl Owner<'_> {
    fn prefix(&self) -> String {
        format!("rg:{{own:{}}}", self.0)
    }

    /// A network's record: `name`, `created_ms`.
    pub fn network(&self, network: &str) -> String {
        format!("{}:net:{network}", self.prefix())
    }

    /// Pending passphrases: hash → `<created_ms>|<expires_ms>|<node_name>`.
    pub fn passphrases(&self, network: &str) -> String {
        format!("{}:net:{network}:pp", self.prefix())
    }

    /// Pending passphrases by node name: name → hash.
    pub fn passphrase_names(&self, network: &str) -> String {
        format!("{}:net:{network}:ppnames", self.prefix())
    }

    /// The answer to a registration, for its byte-identical retries.
    pub fn replay(&self, network: &str, replay_key: &[u8; 32]) -> String {
        format!(
            "{}:net:{network}:replay:{}",
            self.prefix(),
            hex::encode(replay_key)
        )
    }

    /// SCAN pattern of every replay record of `network`.
    pub fn replays(&self, network: &str) -> String {
        format!(
            "{}*",
            super::glob_escape(&format!("{}:net:{network}:replay:", self.prefix()))
        )
    }

    /// The owner's nodes, as a sorted set of `<network>\0<uuid>` (all scores 0): one
    /// key for every network, so a node moving between two of them is one script.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix())
    }

    /// The ids of the owner's networks under the rule `minted`: a set. A registration
    /// in any network of the owner checks the rule of the network the named node is in.
    pub fn minted_networks(&self) -> String {
        format!("{}:minted", self.prefix())
    }

    /// A node's record.
    pub fn node(&self, node: Uuid) -> String {
        format!("{}:node:{}", self.prefix(), node.hyphenated())
    }
}

/// SCAN pattern of every owner's node records; other keys of an owner's slot may match
/// it too, and [`node_record_id`] tells the records apart.
pub const NODE_RECORDS: &str = "rg:{own:*}:node:*";

/// The node id of an [`Owner::node`] key; `None` for any other key. No other key of an
/// owner's slot ends in `:node:<uuid>`: a network id (16 characters at most) is too
/// short to, and the rest end in a fixed word or in hex.
pub fn node_record_id(key: &str) -> Option<Uuid> {
    let (prefix, id) = key.rsplit_once(":node:")?;
    if !prefix.starts_with("rg:{own:") {
        return None;
    }
    Uuid::try_parse(id)
        .ok()
        .filter(|node| node.hyphenated().to_string() == id)
}

/// The member of [`Owner::nodes`] for `node` in `network`.
pub fn node_member(network: &str, node: Uuid) -> String {
    format!("{network}\0{}", node.hyphenated())
}

/// ZRANGEBYLEX bounds of one network's members in [`Owner::nodes`].
pub fn network_members(network: &str) -> (String, String) {
    (format!("[{network}\0"), format!("({network}\u{1}"))
}

/// A pubkey device's record.
pub fn device(id: DeviceId) -> String {
    format!("rg:{{dev:{id}}}")
}

/// SCAN pattern of every [`device`] key (they end in `}`; the nonce keys do not).
pub const DEVICES: &str = "rg:{dev:*}";

/// A used challenge nonce of a device: `1`, with a TTL.
pub fn used_nonce(id: DeviceId, nonce: &[u8; 32]) -> String {
    format!("rg:{{dev:{id}}}:nonce:{}", hex::encode(nonce))
}

/// The JAMScript-OTA portal's keys, as its web pages and servers name them: one
/// Redis, no hash tags (`schemas/redis-keys.md`, "The portal's layout").
pub mod portal {
    use uuid::Uuid;

    /// A network: hash `name`, `createdOn`, `username`.
    pub fn network(id: &str) -> String {
        format!("network:{id}")
    }

    /// SCAN pattern of every network key, and of its sets (told apart by suffix).
    pub const NETWORKS: &str = "network:*";

    /// The suffixes of a network's own sets and hashes, which `NETWORKS` also matches.
    pub const NETWORK_PARTS: [&str; 3] = [":passphrases", ":passphraseNames", ":nodes"];

    /// The owner's networks: a set of ids.
    pub fn user_networks(username: &str) -> String {
        format!("user:{username}:networks")
    }

    /// Pending passphrases, as typed: a set.
    pub fn passphrases(network: &str) -> String {
        format!("network:{network}:passphrases")
    }

    /// Passphrase → node name: a hash.
    pub fn passphrase_names(network: &str) -> String {
        format!("network:{network}:passphraseNames")
    }

    /// The network's node ids: a set.
    pub fn nodes(network: &str) -> String {
        format!("network:{network}:nodes")
    }

    /// A node: hash `status`, `name`, `type`, `arch`, `encKey`, `ip`, `createdOn`,
    /// `lastRegisteredOn`, `lastOnlineOn`, `networkId`, `username`.
    pub fn node(id: Uuid) -> String {
        format!("node:{}", id.hyphenated())
    }

    /// SCAN pattern of every node key.
    pub const NODES: &str = "node:*";

    /// Registrar's own addition: the last state frame that changed a node (the
    /// portal never reads it).
    pub fn last_state(node: Uuid) -> String {
        format!("registrar:state:{}", node.hyphenated())
    }

    /// Registrar's own addition: the answer to a registration, for its byte-identical
    /// retries (the portal never reads it).
    pub fn replay(network: &str, replay_key: &[u8; 32]) -> String {
        format!("registrar:replay:{network}:{}", hex::encode(replay_key))
    }

    /// SCAN pattern of every replay record of `network`.
    pub fn replays(network: &str) -> String {
        format!(
            "{}*",
            super::super::glob_escape(&format!("registrar:replay:{network}:"))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot Redis Cluster gives a key: CRC16 (XMODEM) of its hash tag, mod 16384.
    fn slot(key: &str) -> u16 {
        let tag = match key.find('{') {
            Some(open) => match key[open + 1..].find('}') {
                Some(len) if len > 0 => &key[open + 1..open + 1 + len],
                _ => key,
            },
            None => key,
        };
        crc::Crc::<u16>::new(&crc::CRC_16_XMODEM).checksum(tag.as_bytes()) % 16384
    }

    #[test]
    fn an_owners_keys_share_one_slot_and_a_devices_keys_another() {
        let owner = Owner("alice");
        let node = Uuid::from_bytes([7; 16]);
        let slot_of_alice = slot(&owner.network("lab"));
        for key in [
            owner.passphrases("lab"),
            owner.passphrase_names("other"),
            owner.replay("lab", &[1; 32]),
            owner.nodes(),
            owner.node(node),
        ] {
            assert_eq!(slot(&key), slot_of_alice, "{key}");
        }
        let dev = DeviceId([9; 16]);
        assert_eq!(slot(&used_nonce(dev, &[3; 32])), slot(&device(dev)));
        assert_eq!(node_record_id(&owner.node(node)), Some(node));
        assert_eq!(node_record_id(&Owner("o:node:x").node(node)), Some(node));
        for other in [
            owner.nodes(),
            owner.network("lab"),
            owner.replay("lab", &[1; 32]),
            Owner(&format!("x:node:{node}")).nodes(),
            node_owner(node),
            device(dev),
        ] {
            assert_eq!(node_record_id(&other), None, "{other}");
        }
        // Known slots of the CRC16 reference (Redis' cluster spec): "123456789" → 0x31C3.
        assert_eq!(slot("{123456789}x"), 0x31c3);
    }
}
