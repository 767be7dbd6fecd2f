//! `hyper-floor LISTEN_PORT UPSTREAM_PORT`: hyper's HTTP/1 server and client and nothing
//! else — each accepted connection gets its own upstream connection, every request is sent
//! on it as received and its response returned as received. No routing, balancing, pooling,
//! metrics, header rewriting or timeouts: what is left is hyper and the runtime.

use std::cell::RefCell;
use std::rc::Rc;

use http1_floor::Error;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

fn main() -> Result<(), Error> {
    http1_floor::run(serve)
}

async fn serve(client: TcpStream, upstream: u16) -> Result<(), Error> {
    client.set_nodelay(true)?;
    let server = http1_floor::connect(upstream).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(server)).await?;
    tokio::task::spawn_local(connection);
    // HTTP/1: one request at a time per connection, so the sender is taken for a request and
    // given back once its response head has arrived.
    let sender: Rc<RefCell<Option<SendRequest<Incoming>>>> = Rc::new(RefCell::new(Some(sender)));
    let service = service_fn(move |request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut taken = sender.borrow_mut().take().ok_or("a request while another is in flight")?;
            taken.ready().await?;
            let response: Response<Incoming> = taken.send_request(request).await?;
            *sender.borrow_mut() = Some(taken);
            Ok::<_, Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service).await?;
    Ok(())
}
