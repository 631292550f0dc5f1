//! IPVS mode on a kernel that has IPVS: Debian's cloud kernel in a qemu VM (`hack/ipvs-vm.sh`).
//! Inside the VM, svcplane programs IPVS from fixture files (no apiserver there), `ipvsadm -Ln`
//! must show exactly the expected virtual and real servers, and real TCP from a client namespace
//! is balanced over backend namespaces. A second fixture changes only what differs.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use serde_json::{Value, json};
use svcplane_e2e::{repo_root, svcplane_bin};

fn service(name: &str, ip: &str, port: u16, extra: Value) -> Value {
    let mut spec = json!({"clusterIP": ip, "clusterIPs": [ip],
        "ports": [{"name": "p", "port": port, "protocol": "TCP", "targetPort": 8080}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"kind": "Service", "metadata": {"namespace": "ns", "name": name}, "spec": spec})
}

fn slice(service: &str, backends: &[u8]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|i| json!({"addresses": [format!("10.1.{i}.2")], "nodeName": "vm", "conditions": {"ready": true}}))
        .collect();
    json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": format!("{service}-1"),
        "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

const SCENARIO: &str = r#"
IP=/usr/sbin/ip
sysctl -qw net.ipv4.ip_forward=1
modprobe veth; modprobe dummy
# Backend 4 has no route back to clients: only masqueraded traffic can be answered.
for i in 1 2 3 4; do
  $IP netns add b$i
  $IP link add vb$i type veth peer name eth0 netns b$i
  $IP addr add 10.1.$i.1/24 dev vb$i; $IP link set vb$i up
  $IP -n b$i link set lo up; $IP -n b$i addr add 10.1.$i.2/24 dev eth0; $IP -n b$i link set eth0 up
  [ $i = 4 ] || $IP -n b$i route add default via 10.1.$i.1
  $IP -6 addr add fd00:1:$i::1/64 dev vb$i nodad; $IP -n b$i -6 addr add fd00:1:$i::2/64 dev eth0 nodad
  $IP -n b$i -6 route add default via fd00:1:$i::1
  mkdir -p /www$i; echo "backend-$i" > /www$i/index.html
  $IP netns exec b$i httpd -p 8080 -h /www$i
done
$IP netns add c
$IP link add vc type veth peer name eth0 netns c
$IP addr add 10.2.0.1/24 dev vc; $IP link set vc up
$IP -n c link set lo up; $IP -n c addr add 10.2.0.2/24 dev eth0; $IP -n c link set eth0 up
$IP -n c route add default via 10.2.0.1
$IP -6 addr add fd00:2::1/64 dev vc nodad; $IP -n c -6 addr add fd00:2::2/64 dev eth0 nodad
$IP -n c -6 route add default via fd00:2::1
sysctl -qw net.ipv6.conf.all.forwarding=1
get() { printf 'GET / HTTP/1.0\r\n\r\n' | $IP netns exec c timeout 5 nc "$1" "$2" | tail -1; }
run() { svcplane dataplane --node-name vm --mode auto --node-ip 10.2.0.1 --objects "/scenario/$1" 2>/tmp/log.txt | sed 's/^/SUMMARY /'; cat /tmp/log.txt | sed 's/^/LOG /'; }
run f1.json
echo "== ipvsadm f1"; ipvsadm -Ln
echo "== end"
for k in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "VIP $(get 10.96.0.10 80)"; done
for k in 1 2 3 4 5 6; do echo "NODEPORT $(get 10.2.0.1 30080)"; done
for k in 1 2 3; do echo "AFFINITY $(get 10.96.0.11 443)"; done
echo "MASQUERADED $(get 10.2.0.1 30081)"
echo "EMPTY $(printf 'GET / HTTP/1.0\r\n\r\n' | $IP netns exec c nc -w 3 10.96.0.14 80 2>&1 | tail -1)"
echo "== nft"; nft list ruleset; echo "== end"
run f2.json
echo "== ipvsadm f2"; ipvsadm -Ln
echo "== end"
run f2.json
echo "LINK $($IP -o addr show dev svcplane-ipvs0 | awk '{print $4}' | sort | tr '\n' ' ')"
# One process, two files: back to f1 in a full sync, then to f2 again in an incremental one
# (only the Services that differ are recomputed, read back and planned).
svcplane dataplane --node-name vm --mode auto --node-ip 10.2.0.1 --objects /scenario/f1.json,/scenario/f2.json \
  2>/tmp/log.txt | sed 's/^/INCR /'
echo "== ipvsadm incremental"; ipvsadm -Ln; echo "== end"
echo "LINK2 $($IP -o addr show dev svcplane-ipvs0 | awk '{print $4}' | sort | tr '\n' ' ')"
# Bad input: an unknown scheduler, and a real server the kernel refuses (not unicast).
svcplane dataplane --node-name vm --mode auto --node-ip 10.2.0.1 --scheduler bogus --objects /scenario/f3.json \
  2>/tmp/log3.txt | sed 's/^/BAD /'; echo "BADEXIT $?"; sed 's/^/LOG3 /' /tmp/log3.txt
echo "== ipvsadm f3"; ipvsadm -Ln; echo "== end"
# IPv6: a v6-only Service, balanced over the backends' IPv6 addresses.
run f6.json
for k in 1 2 3 4; do echo "V6 $(get fd00:96::10 80)"; done
# Topology: the node is in zone-a; hints keep traffic on zone-a's endpoint, and an endpoint
# without a hint makes them all count (one process, the second sync incremental).
svcplane dataplane --node-name vm --mode auto --node-ip 10.2.0.1 --objects /scenario/f7.json 2>/dev/null >/dev/null
echo "== ipvsadm f7"; ipvsadm -Ln; echo "== end"
for k in 1 2 3 4 5 6; do echo "ZONED $(get 10.96.0.17 80)"; done
svcplane dataplane --node-name vm --mode auto --node-ip 10.2.0.1 --objects /scenario/f7.json,/scenario/f8.json 2>/dev/null >/dev/null
echo "== ipvsadm f8"; ipvsadm -Ln; echo "== end"
"#;

/// `ipvsadm -Ln` between `== ipvsadm NAME` and `== end`: virtual server line → real servers
/// with weights.
fn ipvsadm(results: &str, name: &str) -> BTreeMap<String, BTreeMap<String, u32>> {
    let mut out: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut current = None;
    let body = results
        .split(&format!("== ipvsadm {name}\n"))
        .nth(1)
        .and_then(|r| r.split("== end").next())
        .unwrap_or_else(|| panic!("no ipvsadm {name} in:\n{results}"));
    for line in body.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"TCP") | Some(&"UDP") => {
                let key = f.join(" ");
                out.insert(key.clone(), BTreeMap::new());
                current = Some(key);
            }
            Some(&"->") if f.get(1) != Some(&"RemoteAddress:Port") => {
                if let Some(k) = &current {
                    out.get_mut(k)
                        .unwrap()
                        .insert(f[1].to_owned(), f[3].parse().unwrap());
                }
            }
            _ => {}
        }
    }
    out
}

fn summaries(results: &str) -> Vec<Value> {
    results
        .lines()
        .filter_map(|l| l.strip_prefix("SUMMARY "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn answers(results: &str, what: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for l in results
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{what} ")))
    {
        *seen.entry(l.trim().to_owned()).or_default() += 1;
    }
    seen
}

fn vs(entries: &[(&str, &[(&str, u32)])]) -> BTreeMap<String, BTreeMap<String, u32>> {
    entries
        .iter()
        .map(|(k, d)| {
            (
                (*k).to_owned(),
                d.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect(),
            )
        })
        .collect()
}

#[test]
fn ipvs_mode_programs_a_real_kernel_and_balances_tcp() {
    let dir = std::env::temp_dir().join(format!("svcplane-e2e-{}-ipvs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let web = json!({"type": "NodePort", "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080, "targetPort": 8080}]});
    let np2 = json!({"type": "NodePort", "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30081, "targetPort": 8080}]});
    let affinity = json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}});
    let f1 = json!({"items": [
        service("web", "10.96.0.10", 80, web.clone()), slice("web", &[1, 2, 3]),
        service("api", "10.96.0.11", 443, affinity.clone()), slice("api", &[1, 2]),
        service("gone", "10.96.0.12", 80, json!({})), slice("gone", &[2]),
        service("np2", "10.96.0.15", 80, np2.clone()), slice("np2", &[4]),
        service("empty", "10.96.0.14", 80, json!({})),
    ]});
    let f2 = json!({"items": [
        service("web", "10.96.0.10", 80, web), slice("web", &[1, 2]),
        service("api", "10.96.0.11", 443, affinity), slice("api", &[1, 2]),
        service("new", "10.96.0.13", 80, json!({})), slice("new", &[3]),
        service("np2", "10.96.0.15", 80, np2), slice("np2", &[4]),
        service("empty", "10.96.0.14", 80, json!({})),
    ]});
    std::fs::write(dir.join("f1.json"), f1.to_string()).unwrap();
    let mut f3 = f2.clone();
    if let Some(items) = f3["items"].as_array_mut() {
        items.push(service("bad", "10.96.0.16", 80, json!({})));
        let mut bad = slice("bad", &[1]);
        bad["endpoints"]
            .as_array_mut()
            .unwrap()
            .push(json!({"addresses": ["224.0.0.5"], "conditions": {"ready": true}}));
        items.push(bad);
    }
    std::fs::write(dir.join("f2.json"), f2.to_string()).unwrap();
    std::fs::write(dir.join("f3.json"), f3.to_string()).unwrap();
    let mut f6 = f2.clone();
    if let Some(items) = f6["items"].as_array_mut() {
        items.push(
            json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "v6"},
            "spec": {"clusterIP": "fd00:96::10", "clusterIPs": ["fd00:96::10"], "ipFamilies": ["IPv6"],
                     "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}}),
        );
        items.push(
            json!({"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": "v6-1",
                "labels": {"kubernetes.io/service-name": "v6"}},
            "addressType": "IPv6", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["fd00:1:1::2"], "conditions": {"ready": true}},
                          {"addresses": ["fd00:1:2::2"], "conditions": {"ready": true}}]}),
        );
    }
    std::fs::write(dir.join("f6.json"), f6.to_string()).unwrap();
    // The node in zone-a; Service zoned prefers its zone: backend 1 in zone-a, 2 and 3 in zone-b.
    let zoned = |hints: [&[&str]; 3]| {
        let mut f = f2.clone();
        let endpoints: Vec<Value> = (1..=3)
            .zip(hints)
            .map(|(i, zones)| {
                let mut e = json!({"addresses": [format!("10.1.{i}.2")], "conditions": {"ready": true}});
                if !zones.is_empty() {
                    e["hints"] =
                        json!({"forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()});
                }
                e
            })
            .collect();
        let mut slice = slice("zoned", &[]);
        slice["endpoints"] = json!(endpoints);
        if let Some(items) = f["items"].as_array_mut() {
            items.push(json!({"kind": "Node", "metadata": {"name": "vm",
                "labels": {"topology.kubernetes.io/zone": "zone-a"}}}));
            items.push(service(
                "zoned",
                "10.96.0.17",
                80,
                json!({"trafficDistribution": "PreferSameZone"}),
            ));
            items.push(slice);
        }
        f
    };
    std::fs::write(
        dir.join("f7.json"),
        zoned([&["zone-a"], &["zone-b"], &["zone-b"]]).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("f8.json"),
        zoned([&["zone-a"], &["zone-b"], &[]]).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("scenario.sh"), SCENARIO).unwrap();
    let out = Command::new("bash")
        .arg(repo_root().join("hack/ipvs-vm.sh"))
        .arg(&dir)
        .env("SVCPLANE_BIN", svcplane_bin())
        .output()
        .unwrap();
    // The serial port turns newlines into CR LF.
    let results = std::fs::read_to_string(dir.join("results.txt"))
        .unwrap_or_default()
        .replace('\r', "");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    if std::env::var_os("SVCPLANE_KEEP_VM_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        out.status.success(),
        "the VM run failed: {}\nresults:\n{results}\nconsole:\n{console}",
        String::from_utf8_lossy(&out.stderr)
    );

    // auto picks IPVS where the kernel has it.
    assert!(results.contains("IPVS mode"), "{results}");

    let backends = [("10.1.1.2:8080", 1), ("10.1.2.2:8080", 1), ("10.1.3.2:8080", 1)];
    assert_eq!(
        ipvsadm(&results, "f1"),
        vs(&[
            ("TCP 10.2.0.1:30080 rr", &backends),
            ("TCP 10.96.0.10:80 rr", &backends),
            ("TCP 10.96.0.11:443 rr persistent 600", &backends[..2]),
            ("TCP 10.96.0.12:80 rr", &[("10.1.2.2:8080", 1)]),
            ("TCP 10.2.0.1:30081 rr", &[("10.1.4.2:8080", 1)]),
            ("TCP 10.96.0.15:80 rr", &[("10.1.4.2:8080", 1)]),
            ("TCP 10.96.0.14:80 rr", &[]),
        ]),
        "{results}"
    );

    // Real TCP: round robin over every backend, through the cluster IP and the node port;
    // persistence keeps one client on one backend.
    let vip = answers(&results, "VIP");
    assert_eq!(
        vip.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2", "backend-3"],
        "{results}"
    );
    assert!(vip.values().all(|n| *n == 4), "round robin: {vip:?}");
    let np = answers(&results, "NODEPORT");
    assert_eq!(
        np.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2", "backend-3"],
        "{results}"
    );
    assert_eq!(answers(&results, "AFFINITY").len(), 1, "{results}");
    // Node-port traffic of a Cluster-policy Service is masqueraded: a backend with no route to
    // the client still answers. A Service without endpoints refuses at once.
    assert_eq!(
        answers(&results, "MASQUERADED").keys().collect::<Vec<_>>(),
        ["backend-4"],
        "{results}"
    );
    let empty = answers(&results, "EMPTY");
    assert!(
        empty.keys().any(|l| l.contains("refused")),
        "{empty:?}\n{results}"
    );

    // The second fixture: one service gone, one new, backend 3 leaves web (drained at weight 0
    // while its connections finish, in both of web's virtual servers); nothing else touched.
    let s = summaries(&results);
    assert_eq!(s.len(), 4, "{results}");
    assert_eq!(s[0]["add_service"], 7);
    assert_eq!(s[0]["add_dest"], 11);
    assert_eq!(s[0]["addresses_added"], 5);
    let second = &s[1];
    assert_eq!(
        (
            &second["add_service"],
            &second["add_dest"],
            &second["del_service"],
            &second["update_dest"],
            &second["update_service"],
            &second["del_dest"],
            &second["failed"],
        ),
        (
            &json!(1),
            &json!(1),
            &json!(1),
            &json!(2),
            &json!(0),
            &json!(0),
            &json!(0)
        ),
        "{second}"
    );
    assert_eq!(
        (&second["addresses_added"], &second["addresses_removed"]),
        (&json!(1), &json!(1))
    );
    let drained = [("10.1.1.2:8080", 1), ("10.1.2.2:8080", 1), ("10.1.3.2:8080", 0)];
    assert_eq!(
        ipvsadm(&results, "f2"),
        vs(&[
            ("TCP 10.2.0.1:30080 rr", &drained),
            ("TCP 10.96.0.10:80 rr", &drained),
            ("TCP 10.96.0.11:443 rr persistent 600", &backends[..2]),
            ("TCP 10.96.0.13:80 rr", &[("10.1.3.2:8080", 1)]),
            ("TCP 10.2.0.1:30081 rr", &[("10.1.4.2:8080", 1)]),
            ("TCP 10.96.0.15:80 rr", &[("10.1.4.2:8080", 1)]),
            ("TCP 10.96.0.14:80 rr", &[]),
        ]),
        "{results}"
    );
    // The same fixture again: nothing to do (the drained backend still has connections).
    assert_eq!(s[2]["operations"], 0, "{}", s[2]);
    // The incremental sync from f1 to f2 does what the full one did, and leaves the same.
    let incr: Vec<Value> = results
        .lines()
        .filter_map(|l| l.strip_prefix("INCR "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(incr.len(), 2, "{results}");
    assert_eq!(
        (&incr[0]["full"], &incr[1]["full"]),
        (&json!(true), &json!(false))
    );
    // web (its endpoint left), gone and new.
    assert_eq!(incr[1]["services_changed"], 3, "{}", incr[1]);
    for k in [
        "add_service",
        "add_dest",
        "del_service",
        "update_dest",
        "del_dest",
        "failed",
        "addresses_added",
        "addresses_removed",
    ] {
        assert_eq!(incr[1][k], second[k], "{k}: {} against {second}", incr[1]);
    }
    assert_eq!(
        ipvsadm(&results, "incremental"),
        ipvsadm(&results, "f2"),
        "{results}"
    );
    let link_of = |prefix: &str| -> BTreeSet<String> {
        results
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(link_of("LINK2 "), link_of("LINK "), "{results}");
    let link: BTreeSet<&str> = results
        .lines()
        .find_map(|l| l.strip_prefix("LINK "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        link,
        [
            "10.96.0.10/32",
            "10.96.0.11/32",
            "10.96.0.13/32",
            "10.96.0.14/32",
            "10.96.0.15/32"
        ]
        .into()
    );

    // Bad input is reported and counted, the rest applied, and the agent finishes normally.
    let bad: Value = results
        .lines()
        .find_map(|l| l.strip_prefix("BAD "))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no summary for the bad fixture:\n{results}"));
    assert_eq!(
        (&bad["add_service"], &bad["add_dest"], &bad["failed"]),
        (&json!(1), &json!(2), &json!(1)),
        "{bad}"
    );
    assert!(results.contains("BADEXIT 0"), "{results}");
    assert!(results.contains("unknown IPVS scheduler"), "{results}");
    assert!(results.contains("IPVS refused an operation"), "{results}");
    let f3 = ipvsadm(&results, "f3");
    assert_eq!(
        f3.get("TCP 10.96.0.16:80 rr"),
        Some(&[("10.1.1.2:8080".to_owned(), 1)].into()),
        "{results}"
    );
    // IPv6 round robin over both IPv6 backends.
    let v6 = answers(&results, "V6");
    assert_eq!(
        v6,
        [("backend-1".to_owned(), 2), ("backend-2".to_owned(), 2)].into(),
        "{results}"
    );
    // Zone hints in IPVS mode: zone-a's endpoint only, then every endpoint once one lacks a hint.
    let zoned = |name: &str| ipvsadm(&results, name).get("TCP 10.96.0.17:80 rr").cloned();
    assert_eq!(
        zoned("f7"),
        Some([("10.1.1.2:8080".to_owned(), 1)].into()),
        "{results}"
    );
    assert_eq!(
        answers(&results, "ZONED"),
        [("backend-1".to_owned(), 6)].into(),
        "{results}"
    );
    assert_eq!(
        zoned("f8"),
        Some(
            [("10.1.1.2:8080", 1), ("10.1.2.2:8080", 1), ("10.1.3.2:8080", 1)]
                .map(|(a, w)| (a.to_owned(), w))
                .into()
        ),
        "{results}"
    );
}
