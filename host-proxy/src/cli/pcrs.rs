//! Expected PCR values from flags (`--pcr N=HEX`) and JSON files (`--pcrs FILE`), in the shapes
//! `attestplane-verify --pcrs` reads: `{"PCR0": "hex", ...}`, `{"0": "hex", ...}`, or nitro-cli's
//! `{"Measurements": {...}, "HashAlgorithm": ...}`. Keys that name no PCR (metadata such as
//! `HashAlgorithm`) are ignored; a PCR key with a bad index or value, or the same PCR twice, is
//! refused.

use std::collections::BTreeMap;
use std::path::Path;

use attestplane_verifier::attestation::{
    MAX_PCRS_JSON_LEN, Pcr, PcrIndex, PcrsFileError, parse_pcr_assignment,
};

use super::{CliError, CliResult};

/// The largest PCR file read.
pub const MAX_PCRS_FILE_LEN: u64 = MAX_PCRS_JSON_LEN as u64;

/// Parses `N=HEX` (a clap value parser).
pub fn parse_pcr_flag(s: &str) -> Result<(PcrIndex, Pcr), String> {
    parse_pcr_assignment(s).map_err(|e| e.to_string())
}

/// Reads a PCR file with the verifier's one reader
/// ([`attestplane_verifier::attestation::read_pcrs_file`]): a file that cannot be read is an I/O
/// error, one of the wrong shape or size a usage error.
pub fn read_pcrs_file(path: &Path) -> CliResult<BTreeMap<PcrIndex, Pcr>> {
    attestplane_verifier::attestation::read_pcrs_file(path).map_err(|e| match e {
        PcrsFileError::Io { .. } => CliError::Io(e.to_string()),
        _ => CliError::Usage(e.to_string()),
    })
}

/// The PCRs of a file and flags together; a flag may not contradict the file.
pub fn merge(file: Option<&Path>, flags: &[(PcrIndex, Pcr)]) -> CliResult<BTreeMap<PcrIndex, Pcr>> {
    let mut out = match file {
        Some(path) => read_pcrs_file(path)?,
        None => BTreeMap::new(),
    };
    for (i, p) in flags {
        if let Some(old) = out.insert(*i, *p)
            && old != *p
        {
            return Err(CliError::Usage(format!(
                "PCR{i} is given twice with different values"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex48(b: u8) -> String {
        hex::encode([b; 48])
    }

    #[test]
    fn pcr_flag_refuses_bad_input() {
        let ok = parse_pcr_flag(&format!("2={}", hex48(7))).unwrap();
        assert_eq!(ok.0.get(), 2);
        assert_eq!(ok.1, Pcr::new([7; 48]));
        for bad in [
            hex48(1),                         // no index
            format!("x={}", hex48(1)),        // index not a number
            format!("99={}", hex48(1)),       // index out of range
            format!("0={}", &hex48(1)[..94]), // too short
            format!("0={}00", hex48(1)),      // too long
            format!("0={}", "zz".repeat(48)), // not hex
            "0=".to_string(),                 // empty
        ] {
            assert!(parse_pcr_flag(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_flag_may_not_contradict_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, format!(r#"{{"PCR0":"{}"}}"#, hex48(1))).unwrap();
        let same = parse_pcr_flag(&format!("0={}", hex48(1))).unwrap();
        let other = parse_pcr_flag(&format!("0={}", hex48(2))).unwrap();
        let extra = parse_pcr_flag(&format!("1={}", hex48(2))).unwrap();
        assert_eq!(merge(Some(&path), &[same, extra]).unwrap().len(), 2);
        assert!(merge(Some(&path), &[other]).is_err());
        assert!(merge(None, &[same, other]).is_err());
    }
}
