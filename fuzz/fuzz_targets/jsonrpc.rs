//! JSON-RPC messages from agents and MCP servers, the views the gateway reads, and the strict
//! JSON reader, I-JSON check and canonical form of their arguments.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use attestplane_verifier::gateway::{jcs, json, jsonrpc};
    if let Ok(m) = jsonrpc::parse_message(data) {
        if let Ok(p) = m.tools_call_params()
            && let Some(a) = p.arguments
        {
            let _ = json::parse_ijson(a.get()).map(|n| jcs::canonicalize_node(&n));
        }
        let _ = m.tools_list_params();
        let _ = m.tools_list_result();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = jcs::canonicalize(text);
    }
});
