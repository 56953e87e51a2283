//! The one MAC address type: parsed from the command line, read from links, shown in logs.

/// A MAC address (`aa:bb:cc:dd:ee:ff` when shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff` (or `-` separated).
    pub fn parse(s: &str) -> Result<MacAddr, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!(
                "'{s}' is not six hex octets like 52:54:00:12:34:56"
            ));
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("'{s}': octet '{part}' is not two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("'{s}': octet '{part}' is not hex"))?;
        }
        if mac[0] & 1 == 1 {
            return Err(format!(
                "'{s}' is a multicast address; a NIC needs a unicast one"
            ));
        }
        if mac == [0; 6] {
            return Err(format!("'{s}' is all zeros"));
        }
        Ok(MacAddr(mac))
    }

    /// A random locally administered unicast address.
    pub fn random_local() -> MacAddr {
        let mut mac = [0u8; 6];
        super::random_bytes(&mut mac);
        mac[0] = (mac[0] & 0xfe) | 0x02;
        MacAddr(mac)
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
