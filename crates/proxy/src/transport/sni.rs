//! Reading a TLS ClientHello: the server name (SNI), for TLS passthrough, and the ALPN
//! protocols, which tell mesh mTLS from application TLS.

/// What a ClientHello asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    /// Lowercased.
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// Returns the SNI host name of a TLS handshake record's payload (the bytes after the 5-byte
/// record header), or `None` if it has none or is malformed.
pub fn server_name(handshake: &[u8]) -> Option<String> {
    client_hello(handshake)?.sni
}

/// Parses a ClientHello (the handshake record's payload); `None` when malformed.
pub fn client_hello(handshake: &[u8]) -> Option<Hello> {
    let mut r = Reader(handshake);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    let n = r.u8()? as usize;
    r.take(n)?; // session id
    let n = r.u16()? as usize;
    r.take(n)?; // cipher suites
    let n = r.u8()? as usize;
    r.take(n)?; // compression methods
    let mut hello = Hello::default();
    if r.0.is_empty() {
        return Some(hello);
    }
    let n = r.u16()? as usize;
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let ext_type = exts.u16()?;
        let n = exts.u16()? as usize;
        let data = exts.take(n)?;
        match ext_type {
            0 => {
                let mut list = Reader(data);
                let n = list.u16()? as usize;
                let mut names = Reader(list.take(n)?);
                while !names.0.is_empty() {
                    let kind = names.u8()?;
                    let n = names.u16()? as usize;
                    let name = names.take(n)?;
                    if kind == 0 && hello.sni.is_none() {
                        hello.sni = std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                    }
                }
            }
            16 => {
                let mut list = Reader(data);
                let n = list.u16()? as usize;
                let mut protocols = Reader(list.take(n)?);
                while !protocols.0.is_empty() {
                    let n = protocols.u8()? as usize;
                    hello.alpn.push(protocols.take(n)?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// A minimal ClientHello record payload carrying `name` as SNI.
    pub fn client_hello(name: &str) -> Vec<u8> {
        let n = name.len() as u16;
        let mut sni = Vec::new();
        sni.extend((n + 3).to_be_bytes());
        sni.push(0);
        sni.extend(n.to_be_bytes());
        sni.extend(name.as_bytes());
        let mut exts = Vec::new();
        exts.extend(0u16.to_be_bytes());
        exts.extend((sni.len() as u16).to_be_bytes());
        exts.extend(sni);
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        hs
    }

    #[test]
    fn reads_sni() {
        assert_eq!(super::server_name(&client_hello("Db.Prod")).as_deref(), Some("db.prod"));
        assert_eq!(super::server_name(&client_hello("x")[..20]), None);
        assert_eq!(super::server_name(&[2, 0, 0, 0]), None);
    }
}
