//! What mskdns learns from AWS at run time: VPC endpoint addresses and subnet AZs from EC2.

pub mod ec2;
