//! `amqps://` end to end: a TLS endpoint with a certificate from a private CA (made here
//! with rcgen) terminates TLS in front of the RabbitMQ server on this machine, the way a
//! load balancer or RabbitMQ's own TLS listener would. The adapter trusts the CA through
//! `tls_ca_file`, and refuses the endpoint without it.

use std::sync::Arc;
use std::time::Duration;

use courier_amqp::AmqpBroker;
use courier_core::{conformance::unique_name, Broker, ConsumerOptions, Message, Source};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// The plain AMQP server behind the TLS endpoint: host and port of `$COURIER_TEST_AMQP`
/// or the local server.
fn upstream() -> String {
    let url = std::env::var("COURIER_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}

/// Starts a TLS endpoint for "localhost" forwarding to the AMQP server; returns its port
/// and the CA certificate's PEM.
async fn tls_endpoint() -> (u16, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &issuer).unwrap();

    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = upstream();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to forward.
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let mut plain = TcpStream::connect(&upstream).await.expect("the AMQP server behind the TLS endpoint");
                tokio::io::copy_bidirectional(&mut tls, &mut plain).await.ok();
            });
        }
    });
    (port, ca_cert.pem())
}

#[tokio::test]
async fn amqps_with_a_private_ca_round_trips() {
    let (port, ca_pem) = tls_endpoint().await;
    let ca_file = std::env::temp_dir().join(format!("courier-test-ca-{port}.pem"));
    std::fs::write(&ca_file, ca_pem).unwrap();

    let url = format!("amqps://guest:guest@localhost:{port}/%2f?tls_ca_file={}", ca_file.display());
    let broker = AmqpBroker::connect(&url).await.expect("TLS connection trusting the private CA");
    let source = Source::queue(&unique_name("tls")).unwrap();
    broker.declare(&source).await.unwrap();
    broker.send(&source.destination(), Message::new("over TLS")).await.unwrap();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(10)).await.unwrap().expect("the message");
    assert_eq!(&d.payload[..], b"over TLS");
    d.ack().await.unwrap();
    broker.close().await.unwrap();

    // Without the CA, the certificate is not trusted, and the error says where it failed
    // without showing the password.
    let untrusted = format!("amqps://guest:s3cret@localhost:{port}/%2f?reconnect_timeout_secs=0");
    let err = AmqpBroker::connect(&untrusted).await.expect_err("an untrusted certificate is refused").to_string();
    assert!(err.contains("could not connect to amqps://guest:***@localhost"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    std::fs::remove_file(ca_file).ok();
}
