//! Snapshots of the wire format. A change here is a protocol change: bump PROTOCOL_VERSION.

use devloop_agent::manifest::{Digest, Entry, Record};
use devloop_agent::protocol::{
    encode_frame, Applied, Chmod, Frame, FromAgent, Problem, RestartReport, Stream, ToAgent, MAGIC, PROTOCOL_VERSION,
};

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

#[test]
fn handshake_bytes() {
    assert_eq!(&MAGIC, b"\x7fDEVLOOP");
    assert_eq!(PROTOCOL_VERSION, 3);
}

#[test]
fn frame_layout() {
    assert_eq!(encode_frame(&Frame::Message(b"{}".to_vec())), b"\0\0\0\x02\x01{}");
    assert_eq!(encode_frame(&Frame::Data(vec![7, 8, 9])), b"\0\0\0\x03\x02\x07\x08\x09");
    assert_eq!(encode_frame(&Frame::DataEnd), b"\0\0\0\0\x03");
}

#[test]
fn client_messages() {
    assert_eq!(
        json(&ToAgent::Hello {
            client: "devloop 0.1.0".into(),
            session: String::new(),
            excludes: vec!["bin/".into()],
            docker_context: None,
            ask: false
        }),
        r#"{"type":"hello","client":"devloop 0.1.0","excludes":["bin/"]}"#
    );
    assert_eq!(
        json(&ToAgent::Batch {
            id: 3,
            deletes: vec!["old.txt".into()],
            chmods: vec![Chmod { path: "run.sh".into(), exec: true }],
        }),
        r#"{"type":"batch","id":3,"deletes":["old.txt"],"chmods":[{"path":"run.sh","exec":true}]}"#
    );
    assert_eq!(json(&ToAgent::Batch { id: 4, deletes: vec![], chmods: vec![] }), r#"{"type":"batch","id":4}"#);
    assert_eq!(
        json(&ToAgent::Hello {
            client: "devloop 0.1.0".into(),
            session: "7-1f".into(),
            excludes: vec![],
            docker_context: None,
            ask: true
        }),
        r#"{"type":"hello","client":"devloop 0.1.0","session":"7-1f","excludes":[],"ask":true}"#
    );
    assert_eq!(json(&ToAgent::Manifest { wanted: false }), r#"{"type":"manifest","wanted":false}"#);
    assert_eq!(json(&ToAgent::Restart), r#"{"type":"restart"}"#);
    assert_eq!(json(&ToAgent::Ready), r#"{"type":"ready"}"#);
    assert_eq!(json(&ToAgent::Bye), r#"{"type":"bye"}"#);
}

#[test]
fn agent_messages() {
    let hash = Digest::of(b"hello");
    assert_eq!(
        json(&FromAgent::Manifest {
            records: vec![
                Record { path: "a.txt".into(), entry: Entry::File { hash, size: 5, exec: false } },
                Record { path: "run.sh".into(), entry: Entry::File { hash, size: 5, exec: true } },
                Record { path: "link".into(), entry: Entry::Symlink { target: "a.txt".into() } },
                Record { path: "src".into(), entry: Entry::Dir },
            ]
        }),
        concat!(
            r#"{"type":"manifest","records":["#,
            r#"{"path":"a.txt","kind":"file","hash":"ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f","size":5},"#,
            r#"{"path":"run.sh","kind":"file","hash":"ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f","size":5,"exec":true},"#,
            r#"{"path":"link","kind":"symlink","target":"a.txt"},"#,
            r#"{"path":"src","kind":"dir"}]}"#
        )
    );
    assert_eq!(
        json(&FromAgent::Applied(Applied {
            id: 3,
            written: 2,
            bytes: 10,
            deleted: 1,
            refused: vec![Problem { path: "../x".into(), message: "path climbs out with `..`".into() }],
            refused_at: vec![0, 4],
            micros: 120
        })),
        r#"{"type":"applied","id":3,"written":2,"bytes":10,"deleted":1,"refused":[{"path":"../x","message":"path climbs out with `..`"}],"refused_at":[0,4],"micros":120}"#
    );
    assert_eq!(
        json(&FromAgent::Welcome {
            agent: "0.1.0".into(),
            root: "/app".into(),
            max_file_size: 1 << 30,
            app_waiting: false
        }),
        r#"{"type":"welcome","agent":"0.1.0","root":"/app","max_file_size":1073741824}"#
    );
    assert_eq!(
        json(&FromAgent::Welcome { agent: "0.1.0".into(), root: "/app".into(), max_file_size: 0, app_waiting: true }),
        r#"{"type":"welcome","agent":"0.1.0","root":"/app","app_waiting":true}"#
    );
    assert_eq!(
        json(&FromAgent::ManifestDigest { digest: hash, entries: 4, from_memory: false }),
        r#"{"type":"manifest_digest","digest":"ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f","entries":4}"#
    );
    assert_eq!(
        json(&FromAgent::ManifestEnd { entries: 4, problems: vec![] }),
        r#"{"type":"manifest_end","entries":4}"#
    );
    assert_eq!(json(&FromAgent::Fatal { message: "boom".into() }), r#"{"type":"fatal","message":"boom"}"#);
    assert_eq!(
        json(&FromAgent::Restart(RestartReport::Restarted {
            pid: 42,
            stop_ms: 1.5,
            start_ms: 0.25,
            ready_ms: Some(3.0)
        })),
        r#"{"type":"restart","outcome":"restarted","pid":42,"stop_ms":1.5,"start_ms":0.25,"ready_ms":3.0}"#
    );
    assert_eq!(
        json(&FromAgent::Restart(RestartReport::BuildFailed { code: 1, output: "error CS1002".into() })),
        r#"{"type":"restart","outcome":"build_failed","code":1,"output":"error CS1002"}"#
    );
    assert_eq!(
        json(&FromAgent::Restart(RestartReport::NotReady { pid: 7, message: "exited".into() })),
        r#"{"type":"restart","outcome":"not_ready","pid":7,"message":"exited"}"#
    );
    assert_eq!(
        json(&FromAgent::Restart(RestartReport::Unsupervised)),
        r#"{"type":"restart","outcome":"unsupervised"}"#
    );
    assert_eq!(
        json(&FromAgent::Output { stream: Stream::Stdout, line: "listening on :80".into() }),
        r#"{"type":"output","stream":"stdout","line":"listening on :80"}"#
    );
    assert_eq!(json(&FromAgent::Exited { pid: 7, code: 143 }), r#"{"type":"exited","pid":7,"code":143}"#);
}

#[test]
fn messages_round_trip() {
    let msg = ToAgent::Batch { id: 9, deletes: vec!["x".into()], chmods: vec![] };
    assert_eq!(serde_json::from_str::<ToAgent>(&json(&msg)).unwrap(), msg);
}
