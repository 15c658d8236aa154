//! wx.getUserInfo: no default implementation; always delegated to the host, in every version.
//! Its parameters (withCredentials, lang) need no checking: the host reads them as it likes.
