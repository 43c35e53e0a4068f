//! Arbitrary bytes after a valid handshake, read as frames and decoded as the CLI's messages:
//! no panic, no allocation beyond the frame limits.
#![no_main]

use devloop_agent::protocol::{FrameReader, ToAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut frames = FrameReader::new(data);
        while let Ok(Some(frame)) = frames.next().await {
            let _ = frame.decode::<ToAgent>();
        }
    });
});
